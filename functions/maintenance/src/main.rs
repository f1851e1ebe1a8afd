//! The scheduled maintenance job as a Lambda (an EventBridge schedule):
//! the presence sweep and retention over every room.
//!
//! A shim over [`maintenance::Maintenance::run`]; clients are built once per
//! cold start. The event is any JSON (an EventBridge `Scheduled Event`, or
//! `{}` from a manual invoke); only its `id` is logged.

use chat_shared::config::MaintenanceConfig;
use chat_shared::telemetry;
use lambda_runtime::{LambdaEvent, service_fn};
use maintenance::{Maintenance, Report};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let config = MaintenanceConfig::from_env()?;
    telemetry::init(config.common.log_format, &config.common.log_filter);
    let job = Maintenance::from_config(&config).await?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        let job = &job;
        async move {
            let id = event.payload.get("id").and_then(Value::as_str);
            tracing::debug!(event_id = id, "maintenance run");
            Ok::<Report, lambda_runtime::Error>(job.run().await?)
        }
    }))
    .await
}
