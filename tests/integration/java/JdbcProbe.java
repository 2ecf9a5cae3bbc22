// A small pgjdbc client for tests/integration/test_jdbc.py: connects through dwsproxy and runs
// one query.
//
//   java -cp postgresql.jar:DIR JdbcProbe JDBC-URL [key=value ...]
//
// Each key=value argument becomes a connection property (sslmode, sslcert, sslkey, sslrootcert,
// user, ...). Prints the URL and the properties, what TLS the driver actually negotiated (read
// from the driver's socket), then "result: jdbc-ok <current_user>". On failure prints
// "error: sqlstate=<SQLState> message=<message>" plus the cause chain, and exits 1.
// Exit 2 is a usage error.

import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.net.Socket;
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
        Properties props = new Properties();
        for (int i = 1; i < args.length; i++) {
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
            for (Throwable c = e.getCause(); c != null; c = c.getCause()) {
                System.out.println("cause: " + c);
            }
            System.out.flush();
            System.exit(1);
        } catch (RuntimeException e) {
            System.out.println("error: sqlstate=none message=" + e);
            System.out.flush();
            System.exit(1);
        }
        System.out.println("done");
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
