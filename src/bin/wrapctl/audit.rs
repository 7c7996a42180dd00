//! `wrapctl audit`: offline checks of audit logs.

use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;

use crate::error::{CliError, Failure};
use crate::output::{ErasedReport, Report, fields, table};

/// `wrapctl audit ...`
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log's hash chain; report the first broken, edited, reordered or
    /// missing line.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// What the first line must follow (default: whatever it names; 64 zeros for a new
        /// log, the previous file's last hash after a rotation).
        #[arg(long)]
        anchor: Option<String>,
        /// The hash the last line must have (a value recorded earlier: detects truncation).
        #[arg(long)]
        expect_last: Option<String>,
        /// A chain head recorded earlier, `SEQ:HASH` (`wrapd audit head` prints the one in
        /// the metadata store): the file must reach it.
        #[arg(long)]
        head: Option<String>,
        /// Succeed although the log holds `AuditGap` records (gaps an operator accepted at
        /// start-up); they are still listed.
        #[arg(long)]
        allow_gaps: bool,
    },
}

/// A verified log, as printed.
#[derive(Serialize)]
struct Verified {
    status: &'static str,
    records: u64,
    anchor: String,
    last_seq: u64,
    last_hash: String,
    gaps: Vec<Gap>,
}

#[derive(Serialize)]
struct Gap {
    line: u64,
    missing: String,
}

impl Report for Verified {
    fn human(&self) -> String {
        let mut text = fields(&[
            ("status", self.status.to_owned()),
            ("records", self.records.to_string()),
            ("anchor", self.anchor.clone()),
            ("last_seq", self.last_seq.to_string()),
            ("last_hash", self.last_hash.clone()),
        ]);
        if !self.gaps.is_empty() {
            text.push('\n');
            text.push_str(&table(
                ["GAP AT LINE", "MISSING"],
                self.gaps
                    .iter()
                    .map(|g| [g.line.to_string(), g.missing.clone()]),
            ));
        }
        text
    }
}

/// Runs an `audit` command.
pub fn run(cmd: AuditCommand) -> Result<Box<dyn ErasedReport>, CliError> {
    let AuditCommand::Verify {
        file,
        anchor,
        expect_last,
        head,
        allow_gaps,
    } = cmd;
    let head = head
        .map(|h| {
            wrapd::audit::ChainHead::parse(&h).ok_or_else(|| {
                CliError::usage(format!(
                    "--head must be SEQ:HASH (64 hex digits), not {h:?}"
                ))
            })
        })
        .transpose()?;
    let reader = std::fs::File::open(&file)
        .map(std::io::BufReader::new)
        .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let options = wrapd::audit::VerifyOptions {
        anchor: anchor.as_deref(),
        expect_last: expect_last.as_deref(),
        head: head.as_ref(),
    };
    let verified = wrapd::audit::verify_with(reader, &options).map_err(|broken| {
        CliError::new(
            Failure::Invalid,
            format!("{}: broken at {broken}", file.display()),
        )
    })?;
    if let (Some(first), false) = (verified.gaps.first(), allow_gaps) {
        return Err(CliError::new(
            Failure::Invalid,
            format!(
                "{}: the chain is linked, but holds {} accepted gap(s); first at line {}: {} (--allow-gaps to accept)",
                file.display(),
                verified.gaps.len(),
                first.0,
                first.1
            ),
        ));
    }
    Ok(Box::new(Verified {
        status: if verified.gaps.is_empty() {
            "intact"
        } else {
            "intact-with-gaps"
        },
        records: verified.records,
        anchor: verified.anchor,
        last_seq: verified.last_seq,
        last_hash: verified.last_hash,
        gaps: verified
            .gaps
            .into_iter()
            .map(|(line, missing)| Gap { line, missing })
            .collect(),
    }))
}
