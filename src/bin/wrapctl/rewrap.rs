//! `wrapctl rewrap PATH...`: the data keys of stored Encryption SDK messages moved to their
//! key's current version (or `--to KEY`), frames untouched (`wrapd::client::rewrap`), with a
//! progress bar on a terminal, a summary at the end, and a non-zero exit naming each file
//! that failed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use serde::Serialize;
use tonic::transport::Channel;
use wrapd::client::rewrap::{Outcome, Rewrapper, rewrap_message_file};

use crate::error::{CliError, Failure};
use crate::output::{Report, table};
use crate::tree::{self, Entry};

/// One object's result, as printed.
#[derive(Serialize)]
pub struct Item {
    /// The file (or S3 object).
    pub path: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What a re-wrap run did.
#[derive(Serialize)]
pub struct RewrapReport {
    pub dry_run: bool,
    pub items: Vec<Item>,
    /// How many objects ended in each status.
    pub summary: BTreeMap<&'static str, u64>,
    /// Re-wrapped (or, dry run, to be re-wrapped) data keys per move `FROM -> TO`.
    pub moves: BTreeMap<String, u64>,
}

impl RewrapReport {
    pub fn new(dry_run: bool, items: Vec<Item>) -> Self {
        let mut summary = BTreeMap::new();
        let mut moves = BTreeMap::new();
        for item in &items {
            *summary.entry(item.outcome.status()).or_insert(0) += 1;
            if let Outcome::Rewrapped { from, to } | Outcome::WouldRewrap { from, to } =
                &item.outcome
            {
                for (f, t) in from.iter().zip(to) {
                    *moves.entry(format!("{f} -> {t}")).or_insert(0) += 1;
                }
            }
        }
        Self {
            dry_run,
            items,
            summary,
            moves,
        }
    }

    /// The error naming every object that failed, if any did.
    pub fn failure(&self) -> Option<CliError> {
        let failed: Vec<String> = self
            .items
            .iter()
            .filter_map(|i| match &i.outcome {
                Outcome::Failed { reason } => Some(format!("{}: {reason}", i.path)),
                _ => None,
            })
            .collect();
        (!failed.is_empty()).then(|| {
            CliError::new(
                Failure::Other,
                format!(
                    "{} could not be re-wrapped and were left as they were:\n  {}",
                    failed.len(),
                    failed.join("\n  ")
                ),
            )
        })
    }
}

impl Report for RewrapReport {
    fn human(&self) -> String {
        let mut text = String::new();
        let shown = self
            .items
            .iter()
            .filter(|i| !matches!(i.outcome, Outcome::UpToDate | Outcome::Skipped { .. }));
        let rows: Vec<[String; 3]> = shown
            .map(|i| {
                let detail = match &i.outcome {
                    Outcome::Rewrapped { from, to } | Outcome::WouldRewrap { from, to } => from
                        .iter()
                        .zip(to)
                        .map(|(f, t)| format!("{f} -> {t}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Outcome::Failed { reason } => reason.clone(),
                    _ => String::new(),
                };
                [i.path.clone(), i.outcome.status().to_owned(), detail]
            })
            .collect();
        if !rows.is_empty() {
            text.push_str(&table(["OBJECT", "STATUS", "DETAIL"], rows));
            text.push_str("\n\n");
        }
        text.push_str(&table(
            ["STATUS", "OBJECTS"],
            self.summary
                .iter()
                .map(|(s, n)| [(*s).to_owned(), n.to_string()]),
        ));
        if !self.moves.is_empty() {
            text.push_str("\n\n");
            text.push_str(&table(
                [
                    if self.dry_run { "WOULD MOVE" } else { "MOVED" },
                    "DATA KEYS",
                ],
                self.moves.iter().map(|(m, n)| [m.clone(), n.to_string()]),
            ));
        }
        text
    }
}

/// A progress bar over `len` objects, drawn only on a terminal.
pub fn progress(len: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let style = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {wide_msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    indicatif::ProgressBar::new(len).with_style(style)
}

/// Re-wraps the messages under `paths`.
pub async fn run(
    channel: Channel,
    paths: &[PathBuf],
    moving: Option<(String, String)>,
    dry_run: bool,
    max_encrypted_data_keys: u16,
) -> RewrapReport {
    let mut rewrapper = Rewrapper::new(channel, moving);
    let entries = tree::files(paths);
    let bar = progress(entries.len() as u64);
    let mut items = Vec::with_capacity(entries.len());
    for entry in entries {
        let item = match entry {
            Entry::Unreadable { path, reason } => Item {
                path: path.display().to_string(),
                outcome: Outcome::Failed { reason },
            },
            Entry::File { path, named } => {
                bar.set_message(path.display().to_string());
                let outcome =
                    rewrap_message_file(&path, &mut rewrapper, max_encrypted_data_keys, dry_run)
                        .await;
                // A file named on the command line is expected to be a message.
                let outcome = match outcome {
                    Outcome::Skipped { reason } if named => Outcome::Failed { reason },
                    other => other,
                };
                Item {
                    path: path.display().to_string(),
                    outcome,
                }
            }
        };
        bar.inc(1);
        items.push(item);
    }
    bar.finish_and_clear();
    RewrapReport::new(dry_run, items)
}
