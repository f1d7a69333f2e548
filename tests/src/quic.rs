//! Real QUIC behind the VIP (quinn): servers that issue QUIC-LB connection
//! IDs carrying their server id, and clients that can change their address
//! mid-connection. The connection ID generator is also what
//! docs/operations.md shows a backend operator.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_common::quic_lb::{QuicLbParams, encode_cid};
use quinn::{
    ClientConfig, Connection, ConnectionIdGenerator, Endpoint, EndpointConfig, ServerConfig,
    TokioRuntime, TransportConfig,
};
use rand::RngCore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The name servers present and clients check.
pub const SERVER_NAME: &str = "lb.test";

/// Issues QUIC-LB plaintext connection IDs: config rotation and length in
/// the first octet, the server id, a random nonce.
pub struct QuicLbCids {
    pub params: QuicLbParams,
    pub server_id: u32,
}

impl ConnectionIdGenerator for QuicLbCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut nonce = [0u8; 18];
        rand::rng().fill_bytes(&mut nonce);
        quinn::ConnectionId::new(&encode_cid(&self.params, self.server_id, &nonce))
    }

    fn cid_len(&self) -> usize {
        self.params.cid_len() as usize
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A self-signed certificate for `SERVER_NAME`, shared by a testbed's servers.
#[derive(Clone)]
pub struct TestCert {
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TestCert {
    pub fn new() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.into()]).expect("rcgen");
        TestCert {
            cert: ck.cert.der().clone(),
            key: ck.key_pair.serialize_der(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    /// A client configuration that trusts this certificate only.
    pub fn client_config(&self) -> ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let mut c = ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_millis(500)));
        t.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
        c.transport_config(Arc::new(t));
        c
    }
}

impl Default for TestCert {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves QUIC on `addr` in the calling thread's network namespace until
/// `stop`: each bidirectional stream's request is answered with
/// "<name> <request>". Connection IDs carry `server_id` under `params`.
pub fn serve(
    name: String,
    addr: SocketAddr,
    params: QuicLbParams,
    server_id: u32,
    cert: TestCert,
    stop: Arc<AtomicBool>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut server = ServerConfig::with_single_cert(vec![cert.cert.clone()], cert.key())
            .expect("server config");
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
        server.transport_config(Arc::new(t));
        server.migration(true);
        let mut config = EndpointConfig::default();
        config.cid_generator(move || Box::new(QuicLbCids { params, server_id }));
        let socket = UdpSocket::bind(addr).expect("bind QUIC");
        let endpoint = Endpoint::new(config, Some(server), socket, Arc::new(TokioRuntime))
            .expect("QUIC endpoint");
        while !stop.load(Ordering::Relaxed) {
            let incoming =
                tokio::time::timeout(Duration::from_millis(100), endpoint.accept()).await;
            let Ok(Some(incoming)) = incoming else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let name = name.clone();
                    tokio::spawn(async move {
                        let Ok(req) = recv.read_to_end(1024).await else {
                            return;
                        };
                        let answer = format!("{name} {}", String::from_utf8_lossy(&req));
                        let _ = send.write_all(answer.as_bytes()).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
        endpoint.close(0u32.into(), b"stopped");
    });
}

/// One client connection with an endpoint of its own (so it can move
/// alone).
pub struct QuicClient {
    pub endpoint: Endpoint,
    pub conn: Connection,
}

impl QuicClient {
    /// Connects from `local` (port 0: any) to `server`.
    pub async fn connect(local: SocketAddr, server: SocketAddr, cert: &TestCert) -> Option<Self> {
        let socket = UdpSocket::bind(local).ok()?;
        let mut endpoint = Endpoint::new(
            EndpointConfig::default(),
            None,
            socket,
            Arc::new(TokioRuntime),
        )
        .ok()?;
        endpoint.set_default_client_config(cert.client_config());
        let connecting = endpoint.connect(server, SERVER_NAME).ok()?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .ok()?
            .ok()?;
        Some(QuicClient { endpoint, conn })
    }

    /// Moves the connection to a new socket on `ip` (a new port): what a
    /// NAT rebinding or a change of network does to a client.
    pub fn rebind(&self, ip: IpAddr) -> std::io::Result<SocketAddr> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        let addr = socket.local_addr()?;
        self.endpoint.rebind(socket)?;
        Ok(addr)
    }
}

/// Sends `msg` on a new stream of `conn`; the answer, or `None` within `wait`.
pub async fn ask(conn: &Connection, msg: &str, wait: Duration) -> Option<String> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(msg.as_bytes()).await.ok()?;
        send.finish().ok()?;
        let answer = recv.read_to_end(1024).await.ok()?;
        String::from_utf8(answer).ok()
    };
    tokio::time::timeout(wait, exchange).await.ok().flatten()
}
