//! Metering hooks: where usage records go once the control plane has made them.
//!
//! The control plane calls every registered [`MeterSink`] for each record. The ledger
//! is one sink ([`crate::ledger::LedgerHandle`]); [`JsonLinesExporter`] writes records
//! as JSON lines for a user's own billing; [`MeterFanout`] sends to several.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::SettlementResult;
use crate::usage::UsageRecord;

/// Receives usage records. Implementations must tolerate re-delivery of a record (same
/// `record_id`) after a crash: the ledger accepts it once, an exporter may repeat it.
pub trait MeterSink: Send + Sync {
    fn record(&self, record: &UsageRecord) -> SettlementResult<()>;

    fn record_batch(&self, records: &[UsageRecord]) -> SettlementResult<()> {
        records.iter().try_for_each(|record| self.record(record))
    }

    /// Makes everything recorded so far durable or visible.
    fn flush(&self) -> SettlementResult<()> {
        Ok(())
    }
}

/// Writes each record as one line of JSON to any writer.
pub struct JsonLinesExporter<W: Write + Send> {
    writer: Mutex<W>,
}

impl<W: Write + Send> JsonLinesExporter<W> {
    pub fn new(writer: W) -> Self {
        JsonLinesExporter { writer: Mutex::new(writer) }
    }

    pub fn into_inner(self) -> W {
        self.writer.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl JsonLinesExporter<BufWriter<File>> {
    /// Appends to the file at `path`, creating it if absent.
    pub fn append_to(path: impl AsRef<Path>) -> SettlementResult<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonLinesExporter::new(BufWriter::new(file)))
    }
}

impl<W: Write + Send> MeterSink for JsonLinesExporter<W> {
    fn record(&self, record: &UsageRecord) -> SettlementResult<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.write_all(&line)?;
        Ok(())
    }

    fn flush(&self) -> SettlementResult<()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
        Ok(())
    }
}

/// Reads records written by [`JsonLinesExporter`] (blank lines are skipped).
pub fn read_json_lines(reader: impl BufRead) -> SettlementResult<Vec<UsageRecord>> {
    let mut records = Vec::new();
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(&line)?);
    }
    Ok(records)
}

/// Sends every record to each sink in turn; stops at the first error.
#[derive(Clone, Default)]
pub struct MeterFanout {
    sinks: Vec<Arc<dyn MeterSink>>,
}

impl MeterFanout {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, sink: Arc<dyn MeterSink>) -> Self {
        self.sinks.push(sink);
        self
    }
}

impl MeterSink for MeterFanout {
    fn record(&self, record: &UsageRecord) -> SettlementResult<()> {
        self.sinks.iter().try_for_each(|sink| sink.record(record))
    }

    fn record_batch(&self, records: &[UsageRecord]) -> SettlementResult<()> {
        self.sinks.iter().try_for_each(|sink| sink.record_batch(records))
    }

    fn flush(&self) -> SettlementResult<()> {
        self.sinks.iter().try_for_each(|sink| sink.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::RecordId;
    use ionet_common::resources::GPU;
    use ionet_common::{JobId, NodeId, Quantity, ResourceSet};

    fn sample(id: u128) -> UsageRecord {
        UsageRecord {
            record_id: RecordId(id),
            job_id: JobId::from_sequence(3),
            payer_account: "alice".into(),
            node_id: NodeId::from_array([2; 28]),
            provider_wallet: "wallet-a".into(),
            resources: ResourceSet::new().with(GPU, Quantity::from_units(2_500)),
            start_ms: 10,
            end_ms: 20,
            price_per_gpu_hour: 1_500_000,
            price_per_cpu_hour: 0,
        }
    }

    #[test]
    fn json_lines_round_trip_in_memory() {
        let exporter = JsonLinesExporter::new(Vec::new());
        exporter.record_batch(&[sample(1), sample(2)]).unwrap();
        let bytes = exporter.into_inner();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with(r#"{"record_id":"00000000000000000000000000000001","job_id":"00000003""#), "{text}");
        assert!(text.contains(r#""resources":{"GPU":2500}"#), "{text}");
        let back = read_json_lines(bytes.as_slice()).unwrap();
        assert_eq!(back, vec![sample(1), sample(2)]);
    }

    #[test]
    fn json_lines_append_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        for id in [1, 2] {
            let exporter = JsonLinesExporter::append_to(&path).unwrap();
            exporter.record(&sample(id)).unwrap();
            exporter.flush().unwrap();
        }
        let file = std::io::BufReader::new(File::open(&path).unwrap());
        assert_eq!(read_json_lines(file).unwrap(), vec![sample(1), sample(2)]);
    }
}
