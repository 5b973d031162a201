//! Results: one JSON line on stdout, and a readable table on stderr.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// An ordered list of named results for one scenario run.
pub struct Report {
    fields: Vec<(String, Value)>,
}

impl Report {
    /// Starts a report with the scenario name and label.
    pub fn new(scenario: &str, label: &str) -> Self {
        Self { fields: vec![("scenario".into(), json!(scenario)), ("label".into(), json!(label))] }
    }

    /// Adds a field.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.fields.push((key.to_string(), value.into()));
        self
    }

    /// Adds a float rounded to `digits` decimals.
    pub fn setf(&mut self, key: &str, value: f64, digits: i32) -> &mut Self {
        let m = 10f64.powi(digits);
        let v = if value.is_finite() { json!((value * m).round() / m) } else { Value::Null };
        self.set(key, v)
    }

    /// Adds `{prefix}_p50_us`, p90, p99, p999 and max (microseconds) and the sample count.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>) -> &mut Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        self.set(&format!("{prefix}_samples"), h.len());
        if h.is_empty() {
            return self;
        }
        self.setf(&format!("{prefix}_p50_us"), us(h.value_at_quantile(0.50)), 1);
        self.setf(&format!("{prefix}_p90_us"), us(h.value_at_quantile(0.90)), 1);
        self.setf(&format!("{prefix}_p99_us"), us(h.value_at_quantile(0.99)), 1);
        self.setf(&format!("{prefix}_p999_us"), us(h.value_at_quantile(0.999)), 1);
        self.setf(&format!("{prefix}_max_us"), us(h.max()), 1)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// A two-column table for humans.
    pub fn table(&self) -> String {
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        let line = format!("+{}+{}+\n", "-".repeat(width + 2), "-".repeat(24));
        out.push_str(&line);
        for (k, v) in &self.fields {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("| {k:<width$} | {v:>22} |\n"));
        }
        out.push_str(&line);
        out
    }

    /// Prints the table to stderr and the JSON line to stdout.
    pub fn emit(&self) {
        eprint!("{}", self.table());
        println!("{}", self.to_json());
    }
}

/// A latency histogram in nanoseconds, 1 ns .. 120 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_table_hold_all_fields() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let mut r = Report::new("latency", "x");
        r.set("pairs", 3).setf("rate", 1.23456, 2).latency("lat", &h);
        let j = r.to_json();
        assert_eq!(j["pairs"], 3);
        assert_eq!(j["rate"], 1.23);
        let p50 = j["lat_p50_us"].as_f64().unwrap();
        assert!((499.0..=501.0).contains(&p50), "{p50}");
        assert!(r.table().contains("lat_p99_us"));
    }
}
