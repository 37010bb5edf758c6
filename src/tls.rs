//! TLS for the gRPC listener, from PEM files read once at start.
//!
//! Every TLS stack in the process (tonic, sqlx for PostgreSQL, redis-rs) is
//! rustls with the `ring` provider; `install_crypto_provider` makes that the
//! process default, so a dependency that one day enables a second provider
//! does not leave rustls unable to choose (a panic at the first handshake).

use std::{path::Path, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A client that connects but does not finish its handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn install_crypto_provider() {
    // Err means a provider is installed already (a second call): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The listener's TLS settings: `None` (plaintext) when neither certificate
/// nor key is given. With `client_ca`, clients must present a certificate it signed.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) if client_ca.is_none() => return Ok(None),
        (None, None) => anyhow::bail!("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE"),
        _ => anyhow::bail!("TLS_CERT_FILE and TLS_KEY_FILE go together: set both or neither"),
    };
    let identity = Identity::from_pem(read(cert, "TLS_CERT_FILE")?, read(key, "TLS_KEY_FILE")?);
    let mut config = ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
    if let Some(client_ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(client_ca, "TLS_CLIENT_CA_FILE")?));
    }
    // The PEM is parsed when a server takes the settings: do it now, so a bad
    // file fails the start with its name rather than the first connection.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .context("TLS_CERT_FILE, TLS_KEY_FILE or TLS_CLIENT_CA_FILE does not hold what it should")?;
    Ok(Some(config))
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))
}
