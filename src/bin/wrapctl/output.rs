//! Printing results: JSON from each result's `Serialize` (`--json`), or for people, aligned
//! tables (lists) and `field: value` lines (single objects).

use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use serde::Serialize;

/// A command's result.
pub trait Report: Serialize {
    /// What a person reads.
    fn human(&self) -> String;
}

/// Prints `report` as JSON or for people.
pub fn print(report: &dyn ErasedReport, json: bool) {
    if json {
        println!("{}", report.json());
    } else {
        let text = report.human();
        println!("{}", text.trim_end());
    }
}

/// [`Report`] behind a pointer (Serialize is not object safe).
pub trait ErasedReport {
    /// The JSON form.
    fn json(&self) -> String;
    /// The human form.
    fn human(&self) -> String;
}

impl<T: Report> ErasedReport for T {
    fn json(&self) -> String {
        // Our result types are plain data: serializing them cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn human(&self) -> String {
        Report::human(self)
    }
}

/// An aligned table with a header row.
pub fn table<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(header.map(Cell::new));
    for row in rows {
        table.add_row(row.map(Cell::new));
    }
    table.to_string()
}

/// `field: value` lines (the format scripts have grepped since the first release).
pub fn fields(pairs: &[(&str, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}
