// A small pgjdbc client for tests/integration/test_jdbc.py: connects through dwsproxy and runs
// one query.
//
//   java -cp postgresql.jar:DIR JdbcProbe JDBC-URL [--query=SQL] [key=value ...]
//
// Each key=value argument becomes a connection property (sslmode, sslcert, sslkey, sslrootcert,
// user, ...). Prints the URL and the properties, what TLS the driver actually negotiated (read
// from the driver's socket), then "result: jdbc-ok <current_user>". With --query=SQL it runs
// that instead and prints "digest: rows=<n> chars=<n> sha256=<hex>": every row's values joined
// by tabs, each row ended by a newline, hashed as UTF-8 (the digest of test_clients.py).
// On failure prints "error: sqlstate=<SQLState> message=<message>", then for an SQLException
// "error_class: <class>" and the cause chain, and exits 1. Exit 2 is a usage error.

import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.cert.Certificate;
import java.security.cert.X509Certificate;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import java.util.TreeSet;
import javax.net.ssl.SSLSession;
import javax.net.ssl.SSLSocket;

public class JdbcProbe {
    public static void main(String[] args) {
        if (args.length < 1) {
            System.err.println("usage: JdbcProbe JDBC-URL [key=value ...]");
            System.exit(2);
        }
        String url = args[0];
        String query = null;
        Properties props = new Properties();
        for (int i = 1; i < args.length; i++) {
            if (args[i].startsWith("--query=")) {
                query = args[i].substring("--query=".length());
                continue;
            }
            int eq = args[i].indexOf('=');
            if (eq <= 0) {
                System.err.println("JdbcProbe: not key=value: " + args[i]);
                System.exit(2);
            }
            props.setProperty(args[i].substring(0, eq), args[i].substring(eq + 1));
        }
        System.out.println("url: " + url);
        for (String name : new TreeSet<>(props.stringPropertyNames())) {
            System.out.println("prop: " + name + "=" + props.getProperty(name));
        }
        System.out.flush();
        try (Connection conn = DriverManager.getConnection(url, props)) {
            describeTls(conn);
            if (query != null) {
                digest(conn, query);
                System.out.println("done");
                return;
            }
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT 'jdbc-ok', current_user")) {
                int rows = 0;
                while (rs.next()) {
                    System.out.println("result: " + rs.getString(1) + " " + rs.getString(2));
                    rows++;
                }
                if (rows != 1) {
                    System.out.println("error: sqlstate=none message=expected one row, got "
                                       + rows);
                    System.exit(1);
                }
            }
        } catch (SQLException e) {
            System.out.println("error: sqlstate=" + e.getSQLState() + " message=" + e.getMessage());
            System.out.println("error_class: " + e.getClass().getName());
            for (Throwable c = e.getCause(); c != null; c = c.getCause()) {
                System.out.println("cause: " + c);
            }
            System.out.flush();
            System.exit(1);
        } catch (NoSuchAlgorithmException | RuntimeException e) {
            System.out.println("error: sqlstate=none message=" + e);
            System.out.flush();
            System.exit(1);
        }
        System.out.println("done");
    }

    private static void digest(Connection conn, String query)
            throws SQLException, NoSuchAlgorithmException {
        MessageDigest sha = MessageDigest.getInstance("SHA-256");
        long rows = 0;
        long chars = 0;
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(query)) {
            int columns = rs.getMetaData().getColumnCount();
            while (rs.next()) {
                StringBuilder line = new StringBuilder();
                for (int c = 1; c <= columns; c++) {
                    String value = rs.getString(c);
                    if (c > 1) {
                        line.append('\t');
                    }
                    line.append(value);
                    chars += value.length();
                }
                line.append('\n');
                sha.update(line.toString().getBytes(StandardCharsets.UTF_8));
                rows++;
            }
        }
        StringBuilder hex = new StringBuilder();
        for (byte b : sha.digest()) {
            hex.append(String.format("%02x", b));
        }
        System.out.println("digest: rows=" + rows + " chars=" + chars + " sha256=" + hex);
    }

    // What the driver really negotiated: its PGStream's socket (QueryExecutorBase.pgStream is
    // protected, hence reflection; the jar is on the class path, so no module boundary).
    private static void describeTls(Connection conn) {
        try {
            Class<?> base = Class.forName("org.postgresql.core.BaseConnection");
            Object executor = base.getMethod("getQueryExecutor").invoke(conn.unwrap(base));
            Field field = null;
            for (Class<?> k = executor.getClass(); k != null && field == null;
                 k = k.getSuperclass()) {
                try {
                    field = k.getDeclaredField("pgStream");
                } catch (NoSuchFieldException ignored) {
                    // look in the superclass
                }
            }
            if (field == null) {
                System.out.println("ssl: unknown (no pgStream field)");
                return;
            }
            field.setAccessible(true);
            Object stream = field.get(executor);
            Method getSocket = stream.getClass().getMethod("getSocket");
            Socket socket = (Socket) getSocket.invoke(stream);
            if (!(socket instanceof SSLSocket)) {
                System.out.println("ssl: false");
                return;
            }
            SSLSession session = ((SSLSocket) socket).getSession();
            System.out.println("ssl: true protocol=" + session.getProtocol()
                               + " cipher=" + session.getCipherSuite());
            Certificate[] peer = session.getPeerCertificates();
            if (peer.length > 0 && peer[0] instanceof X509Certificate) {
                System.out.println("server_cert: "
                                   + ((X509Certificate) peer[0]).getSubjectX500Principal());
            }
            Certificate[] local = session.getLocalCertificates();
            if (local != null && local.length > 0 && local[0] instanceof X509Certificate) {
                System.out.println("client_cert: "
                                   + ((X509Certificate) local[0]).getSubjectX500Principal());
            } else {
                System.out.println("client_cert: none");
            }
        } catch (Exception e) {
            System.out.println("ssl: unknown (" + e + ")");
        }
    }
}
