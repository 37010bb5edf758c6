//! `readthrough health`: asks a running instance's `grpc.health.v1.Health`
//! whether it serves, for container health checks (no probe to download).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// How `health` talks to an instance that serves TLS (an `https://` URL).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HealthTls {
    /// PEM file of the CA that signed the server's certificate (default: the system's roots).
    #[arg(long = "tls-ca-file", env = "HEALTH_TLS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the URL's host
    /// (e.g. the URL says 127.0.0.1 and the certificate names the service).
    #[arg(long = "tls-domain", env = "HEALTH_TLS_DOMAIN")]
    pub domain: Option<String>,
    /// Client certificate (PEM), for a server that requires mutual TLS; with `--tls-key-file`.
    #[arg(long = "tls-cert-file", env = "HEALTH_TLS_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert-file`.
    #[arg(long = "tls-key-file", env = "HEALTH_TLS_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl HealthTls {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.domain.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }

    fn client_config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_file {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }
}

/// Ok when the instance at `url` (e.g. `http://127.0.0.1:50051`, or
/// `https://…` for one that serves TLS) answers SERVING within `timeout`.
pub async fn check(url: &str, tls: &HealthTls, timeout: Duration) -> anyhow::Result<()> {
    let mut endpoint = Endpoint::from_shared(url.to_string()).context("invalid address")?;
    let url = crate::config::redact_url(url);
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(tls.client_config()?).context("TLS settings")?;
    } else if !tls.is_empty() {
        anyhow::bail!("the TLS options need an https:// URL, not {url}");
    }
    let ask = async {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .context("health check failed")?;
        anyhow::Ok(answer.into_inner().status())
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(ServingStatus::Serving)) => Ok(()),
        Ok(Ok(status)) => anyhow::bail!("{url} is {}", status.as_str_name()),
        Ok(Err(error)) => Err(error),
        Err(_) => anyhow::bail!("{url} did not answer within {timeout:?}"),
    }
}
