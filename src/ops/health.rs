//! `readthrough health`: asks a running instance's `grpc.health.v1.Health`
//! whether it serves, for container health checks (no probe to download).

use std::time::Duration;

use anyhow::Context;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Ok when the instance at `url` (e.g. `http://127.0.0.1:50051`) answers SERVING within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let ask = async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .context("invalid address")?
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
