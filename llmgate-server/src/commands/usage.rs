//! `llmgate usage`: usage per key, from the data directory.

use llmgate_core::storage::{KeyStore, StorageError, UsageStore};
use llmgate_core::usage::usage_report;

use super::Output;

/// Prints every key's usage as a table or JSON.
pub async fn run(
    keys: &dyn KeyStore,
    usage: &dyn UsageStore,
    output: Output,
) -> Result<(), StorageError> {
    let report = usage_report(keys, usage).await?;
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("usage serializes")
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<22} {:>9} {:>10} {:>11} {:>10}  LAST REQUEST",
        "NAME", "KEY ID", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"
    );
    for row in report {
        let unknown = if row.requests_without_usage > 0 {
            format!(" ({} without token counts)", row.requests_without_usage)
        } else {
            String::new()
        };
        println!(
            "{:<20} {:<22} {:>9} {:>10} {:>11} {:>10}  {}{unknown}",
            row.name,
            row.key_id,
            row.requests,
            row.prompt_tokens,
            row.completion_tokens,
            row.total_tokens,
            row.last_request_at.map_or("-".to_owned(), |t| t
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()),
        );
    }
    Ok(())
}
