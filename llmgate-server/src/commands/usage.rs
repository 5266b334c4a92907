//! `llmgate usage`: usage per key, from the data directory.

use llmgate_core::storage::{KeyStore, StorageError, UsageStore};
use llmgate_core::usage::{usage_report, KeyUsage};

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
    for row in &report {
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
    print_per_model(&report);
    Ok(())
}

/// Each key's usage split by model, under the table (whose lines scripts may read).
fn print_per_model(report: &[KeyUsage]) {
    if report.iter().all(|row| row.models.is_empty()) {
        return;
    }
    println!();
    println!(
        "{:<20} {:<24} {:>9} {:>10} {:>11} {:>10}",
        "NAME", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"
    );
    for row in report {
        for (model, usage) in &row.models {
            let unknown = if usage.requests_without_usage > 0 {
                format!(" ({} without token counts)", usage.requests_without_usage)
            } else {
                String::new()
            };
            println!(
                "{:<20} {:<24} {:>9} {:>10} {:>11} {:>10}{unknown}",
                row.name,
                printable(model),
                usage.requests,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens(),
            );
        }
    }
}

/// A model name as a terminal line can show it: clients choose model names, so control
/// characters (escape sequences, line breaks) are shown escaped rather than sent to
/// the terminal.
fn printable(name: &str) -> String {
    if name.chars().any(char::is_control) {
        name.escape_debug().to_string()
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_cannot_send_escape_sequences_to_the_terminal() {
        assert_eq!(printable("chat"), "chat");
        assert_eq!(printable("\u{1F980}"), "\u{1F980}");
        assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\nc");
    }
}
