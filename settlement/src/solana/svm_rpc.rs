//! The in-process runtime behind Solana's JSON-RPC over HTTP (feature `svm`), so that the
//! head's RPC client ([`RpcChain`](super::RpcChain)) reads real transactions the way it
//! reads a Solana node: `getSignaturesForAddress` and `getTransaction` over a loopback
//! socket, answered from [`SvmChain`]'s history. The transactions are the runtime's; only
//! the node's transport is ours. One thread per connection, keep-alive, no TLS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use base64::Engine;
use serde_json::{json, Value};
use solana_pubkey::Pubkey;
use solana_signature::Signature;

use super::svm::SvmChain;

/// The largest request body the front reads.
const MAX_BODY: usize = 1 << 20;

impl SvmChain {
    /// Serves this runtime's history as a Solana RPC node on an ephemeral loopback port;
    /// returns its URL. The server lives as long as the process.
    pub fn serve_rpc(&self) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let chain = self.clone();
        std::thread::Builder::new().name("svm-rpc".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let chain = chain.clone();
                let _ = std::thread::Builder::new().name("svm-rpc-conn".into()).spawn(move || serve(stream, &chain));
            }
        })?;
        Ok(url)
    }
}

/// Answers the requests of one connection until it closes or sends something unreadable.
fn serve(stream: TcpStream, chain: &SvmChain) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    while let Some(body) = read_request(&mut reader) {
        let reply = match serde_json::from_slice::<Value>(&body) {
            Ok(request) => answer(&request, chain),
            Err(err) => json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": err.to_string()}}),
        };
        let reply = reply.to_string();
        // One write: a header and a body sent apart wait on the client's delayed ACK.
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One HTTP request's body; `None` at the end of the connection or on a malformed request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    if length > MAX_BODY {
        return None;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

fn answer(request: &Value, chain: &SvmChain) -> Value {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let params = request.get("params").and_then(Value::as_array).cloned().unwrap_or_default();
    let result = match request.get("method").and_then(Value::as_str) {
        Some("getSignaturesForAddress") => signatures_for_address(&params, chain),
        Some("getTransaction") => transaction(&params, chain),
        other => Err((-32601, format!("method {other:?} is not served by the in-process runtime"))),
    };
    match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err((code, message)) => json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
    }
}

type Answer = Result<Value, (i64, String)>;

fn param<T: std::str::FromStr>(value: Option<&Value>, what: &str) -> Result<Option<T>, (i64, String)> {
    match value.and_then(Value::as_str) {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| (-32602, format!("invalid {what}: {text:?}"))),
    }
}

/// Newest first: those before `before` (exclusive) and after `until` (exclusive), at most
/// `limit`.
fn signatures_for_address(params: &[Value], chain: &SvmChain) -> Answer {
    let address: Pubkey = param(params.first(), "address")?.ok_or((-32602, "missing address".to_string()))?;
    let config = params.get(1);
    let field = |name: &str| config.and_then(|config| config.get(name));
    let before: Option<Signature> = param(field("before"), "before")?;
    let until: Option<Signature> = param(field("until"), "until")?;
    let limit = field("limit").and_then(Value::as_u64).unwrap_or(1_000).min(1_000) as usize;
    let history = chain.history();
    let mut found = Vec::new();
    let mut started = before.is_none();
    for (slot, (signature, transaction)) in history.iter().enumerate().rev() {
        if !transaction.message.account_keys.contains(&address) {
            continue;
        }
        if Some(signature) == until.as_ref() || found.len() == limit {
            break;
        }
        if !started {
            started = Some(signature) == before.as_ref();
            continue;
        }
        found.push(json!({
            "signature": signature.to_string(),
            "slot": slot,
            "err": null,
            "memo": null,
            "blockTime": null,
            "confirmationStatus": "finalized",
        }));
    }
    Ok(Value::Array(found))
}

fn transaction(params: &[Value], chain: &SvmChain) -> Answer {
    let wanted: Signature = param(params.first(), "signature")?.ok_or((-32602, "missing signature".to_string()))?;
    let history = chain.history();
    let Some((slot, (_, transaction))) = history.iter().enumerate().find(|(_, (signature, _))| *signature == wanted)
    else {
        return Ok(Value::Null);
    };
    let bytes = wincode::serialize(transaction).map_err(|err| (-32603, format!("encoding {wanted}: {err}")))?;
    Ok(json!({
        "slot": slot,
        "blockTime": null,
        "transaction": [base64::engine::general_purpose::STANDARD.encode(bytes), "base64"],
        "meta": {
            "err": null,
            "status": {"Ok": null},
            "fee": 5000,
            "preBalances": [],
            "postBalances": [],
            "loadedAddresses": {"writable": [], "readonly": []},
        },
        "version": "legacy",
    }))
}
