// One connection of node-postgres (`pg`: its own protocol code on Node's TLS) for
// tests/integration/test_clients.py.
//
//   node probe.js SPEC-JSON
//
// The spec is the one client_probe.py takes (host, port, user, dbname, application_name, tls,
// ca, cert, key, query, timeout). Prints one JSON object: {"ok": true, rows, chars, sha256} with
// the same digest as client_probe.py, or {"ok": false, error_type, shown, sqlstate} with what pg
// raised. Judging is left to the test.

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const { Client } = require('pg');

function digest(rows) {
  const hash = crypto.createHash('sha256');
  let chars = 0;
  for (const row of rows) {
    const values = row.map((v) => String(v));
    for (const v of values) chars += v.length;
    hash.update(values.join('\t') + '\n');
  }
  return { rows: rows.length, chars, sha256: hash.digest('hex') };
}

async function main() {
  const spec = JSON.parse(process.argv[2]);
  const started = Date.now();
  let ssl = false;
  if (spec.tls) {
    // rejectUnauthorized with the test CA, and Node's own host check against the proxy's
    // 127.0.0.1 SAN: the same full verification as the other clients.
    ssl = { ca: fs.readFileSync(spec.ca), rejectUnauthorized: true };
    if (spec.cert) {
      ssl.cert = fs.readFileSync(spec.cert);
      ssl.key = fs.readFileSync(spec.key);
    }
  }
  const client = new Client({
    host: spec.host, port: spec.port, user: spec.user, database: spec.dbname,
    application_name: spec.application_name, ssl,
    connectionTimeoutMillis: spec.timeout * 1000, query_timeout: spec.timeout * 1000,
  });
  let out;
  try {
    await client.connect();
  } catch (err) {
    out = { ok: false, error_type: err.constructor.name, shown: String(err),
            sqlstate: err.code === undefined ? null : err.code, severity: err.severity || null };
  }
  if (out === undefined) {
    try {
      const rows = spec.query
        ? (await client.query({ text: spec.query, rowMode: 'array' })).rows : [];
      out = { ok: true, ...digest(rows) };
    } finally {
      await client.end();
    }
  }
  out.seconds = (Date.now() - started) / 1000;
  out.pg_version = require('pg/package.json').version;
  out.node_version = process.version;
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`probe.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(3);
});
