//! The one place the CLI prints tables and JSON records.

use clap::Args;
use sparse_attn::{Error, Gpu};

/// A table printed with columns aligned to their widest cell: the first column left-aligned,
/// the others right-aligned; `|` separators where a column starts a group.
pub struct Table {
    head: Vec<String>,
    /// Column indices that start a new group (a `|` before them).
    groups: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named by `head`; an entry "|" starts a group of columns there.
    pub fn new(head: &[&str]) -> Self {
        let mut cols = Vec::new();
        let mut groups = Vec::new();
        for h in head {
            if *h == "|" {
                groups.push(cols.len());
            } else {
                cols.push(h.to_string());
            }
        }
        Self {
            head: cols,
            groups,
            rows: Vec::new(),
        }
    }

    /// A row of cells. A row of fewer cells than columns (e.g. a configuration that was
    /// skipped, with why) ends in a note that takes the rest of the line; cells past the
    /// columns are dropped (a row is never a reason to fail).
    pub fn row(&mut self, mut cells: Vec<String>) {
        debug_assert!(cells.len() <= self.head.len(), "table row width");
        cells.truncate(self.head.len());
        self.rows.push(cells);
    }

    /// Column widths: the widest cell of each column, a short row's note left out.
    fn widths(&self) -> Vec<usize> {
        (0..self.head.len())
            .map(|c| {
                self.rows
                    .iter()
                    .filter(|r| c + 1 < r.len() || r.len() == self.head.len())
                    .map(|r| r[c].chars().count())
                    .chain([self.head[c].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn line(&self, cells: &[String], w: &[usize]) -> String {
        let mut out = String::new();
        let note = cells.len() < self.head.len();
        for (c, cell) in cells.iter().enumerate() {
            if c > 0 {
                out.push_str(if self.groups.contains(&c) { " | " } else { " " });
            }
            if note && c + 1 == cells.len() {
                out.push_str(cell);
            } else if c == 0 {
                out.push_str(&format!("{cell:<0$}", w[c]));
            } else {
                out.push_str(&format!("{cell:>0$}", w[c]));
            }
        }
        out.trim_end().to_string()
    }

    /// Aligned text.
    pub fn render(&self) -> String {
        let w = self.widths();
        let mut out = self.line(&self.head, &w);
        for r in &self.rows {
            out.push('\n');
            out.push_str(&self.line(r, &w));
        }
        out
    }

    /// A Markdown table (for records pasted into docs/; `bench train` prints one).
    #[cfg_attr(not(feature = "train"), allow(dead_code))]
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "| {} |\n|{}",
            self.head.join(" | "),
            "---|".repeat(self.head.len())
        );
        for r in &self.rows {
            // Markdown rows have every column: a short row's note, then empty cells.
            let mut cells = r.clone();
            cells.resize(self.head.len(), String::new());
            out.push_str(&format!("\n| {} |", cells.join(" | ")));
        }
        out
    }

    pub fn print(&self) {
        println!("{}", self.render());
    }
}

/// Where a command's record goes.
#[derive(Args)]
pub struct Output {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also append the JSON object (one line) to this file, keeping the table on stdout.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

impl Output {
    /// Check `--json-out` before the work (its folder exists or can be made, it can be written).
    pub fn prepare(&self) -> Result<(), Error> {
        match &self.json_out {
            Some(p) => sparse_attn::files::prepare_file(p),
            None => Ok(()),
        }
    }
}

/// `--offload-path` (parsed once, by clap).
pub fn offload_path(s: &str) -> Result<sparse_attn::decode::OffloadPath, String> {
    sparse_attn::decode::OffloadPath::parse(s).map_err(|e| e.to_string())
}

/// A number that `ok` accepts, else `need` in the error (clap parsers of numbers with a range;
/// NaN and infinities never pass).
fn number_where(s: &str, ok: impl Fn(f64) -> bool, need: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("`{s}` is not a number: {e}"))?;
    match v.is_finite() && ok(v) {
        true => Ok(v),
        false => Err(format!("`{s}`: need {need}")),
    }
}

/// A clap parser for a finite number > 0 (NaN, infinities, zero and negatives are refused).
pub fn positive_f64(s: &str) -> Result<f64, String> {
    number_where(s, |v| v > 0.0, "a finite number > 0")
}

/// A clap parser for a finite number >= 0.
pub fn non_negative_f64(s: &str) -> Result<f64, String> {
    number_where(s, |v| v >= 0.0, "a finite number >= 0")
}

/// A clap parser for a share: above 0, at most 1.
pub fn share(s: &str) -> Result<f64, String> {
    number_where(s, |v| v > 0.0 && v <= 1.0, "a share above 0 and at most 1")
}

/// Complete a benchmark record (device, date, command) and print and/or append it.
pub fn emit_record(gpu: &Gpu, mut record: serde_json::Value, out: &Output) -> Result<(), Error> {
    record["device"] = gpu.adapter().to_string().into();
    record["date_utc"] = utc_date().into();
    record["command"] = std::env::args().collect::<Vec<_>>().join(" ").into();
    let line = serde_json::to_string(&record).expect("json");
    if let Some(path) = &out.json_out {
        // Appended by rewriting the whole file atomically: a full disk leaves the old records,
        // never a torn line.
        let mut text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        sparse_attn::files::write_atomic(path, text.as_bytes())?;
    }
    if out.json {
        println!("{line}");
    }
    Ok(())
}

/// Pretty JSON on stdout.
pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Milliseconds of an optional time, or "-".
pub fn ms(t: Option<f64>) -> String {
    t.map_or("-".into(), |x| format!("{:.3}", x * 1e3))
}

/// Today's date (UTC) as YYYY-MM-DD, for benchmark records.
pub fn utc_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0) as i64;
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_groups() {
        let mut t = Table::new(&["name", "a", "|", "bb"]);
        t.row(vec!["x".into(), "1".into(), "22".into()]);
        t.row(vec!["long".into(), "333".into(), "4".into()]);
        assert_eq!(t.render(), "name   a | bb\nx      1 | 22\nlong 333 |  4");
        assert_eq!(
            t.markdown(),
            "| name | a | bb |\n|---|---|---|\n| x | 1 | 22 |\n| long | 333 | 4 |"
        );
    }

    /// A short row (a skipped configuration) ends in a note over the columns left, without
    /// widening them (it used to index past its cells: `bench decode` panicked on a skip).
    #[test]
    fn a_short_row_ends_in_a_note() {
        let mut t = Table::new(&["name", "a", "|", "bb"]);
        t.row(vec!["x".into(), "1".into(), "22".into()]);
        t.row(vec!["y".into(), "skipped: too large".into()]);
        assert_eq!(
            t.render(),
            "name a | bb\nx    1 | 22\ny    skipped: too large"
        );
        assert_eq!(
            t.markdown(),
            "| name | a | bb |\n|---|---|---|\n| x | 1 | 22 |\n| y | skipped: too large |  |"
        );
    }
}
