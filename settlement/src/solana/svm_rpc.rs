//! The in-process runtime behind Solana's JSON-RPC over HTTP (feature `svm`), so that the
//! head's RPC client ([`RpcChain`](super::RpcChain)) pays and reads real transactions the
//! way it does through a Solana node, over a loopback socket: `sendTransaction`,
//! `getSignatureStatuses`, `getLatestBlockhash`, `isBlockhashValid`, `getAccountInfo`,
//! `getBalance`, `getTokenAccountBalance`, `getSignaturesForAddress` and `getTransaction`,
//! answered by [`SvmChain`]. The transactions and accounts are the runtime's; only the
//! node's transport is ours. One thread per connection, keep-alive, no TLS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use base64::Engine;
use serde_json::{json, Value};
use solana_hash::Hash;
use solana_pubkey::Pubkey;
use solana_signature::Signature;
use solana_transaction::Transaction;

use super::chain::PayoutChain;
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
    match call(request.get("method").and_then(Value::as_str), &params, chain) {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err((code, message)) => json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
    }
}

fn call(method: Option<&str>, params: &[Value], chain: &SvmChain) -> Answer {
    match method {
        Some("getSignaturesForAddress") => signatures_for_address(params, chain),
        Some("getTransaction") => transaction(params, chain),
        Some("sendTransaction") => send_transaction(params, chain),
        Some("getSignatureStatuses") => signature_statuses(params, chain),
        Some("getLatestBlockhash") => {
            let blockhash = chain.svm().latest_blockhash();
            Ok(in_context(
                chain,
                json!({"blockhash": blockhash.to_string(), "lastValidBlockHeight": chain.slot() + 150}),
            ))
        }
        Some("isBlockhashValid") => {
            let blockhash: Hash = required(params, "blockhash")?;
            Ok(in_context(chain, json!(blockhash == chain.svm().latest_blockhash())))
        }
        Some("getAccountInfo") => account_info(params, chain),
        Some("getBalance") => {
            let address: Pubkey = required(params, "address")?;
            Ok(in_context(chain, json!(chain.lamports(&address))))
        }
        Some("getTokenAccountBalance") => token_account_balance(params, chain),
        other => Err((-32601, format!("method {other:?} is not served by the in-process runtime"))),
    }
}

type Answer = Result<Value, (i64, String)>;

/// A reply in the node's `{context, value}` envelope.
fn in_context(chain: &SvmChain, value: Value) -> Value {
    json!({"context": {"slot": chain.slot()}, "value": value})
}

/// Runs a signed legacy transaction (base64, as the client encodes it). One
/// that fails before it is included is refused as a node's preflight would refuse it.
fn send_transaction(params: &[Value], chain: &SvmChain) -> Answer {
    let encoded = params.first().and_then(Value::as_str).ok_or((-32602, "missing transaction".to_string()))?;
    let encoding = params.get(1).and_then(|config| config.get("encoding")).and_then(Value::as_str);
    if encoding.is_some_and(|encoding| encoding != "base64") {
        return Err((-32602, format!("transaction encoding {encoding:?} is not accepted: send base64")));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|err| (-32602, format!("invalid base64 transaction: {err}")))?;
    let transaction: Transaction = wincode::deserialize(&bytes)
        .map_err(|err| (-32602, format!("not a legacy transaction (the runtime takes no others): {err}")))?;
    let mut chain = chain.clone();
    match PayoutChain::send_transaction(&mut chain, &transaction) {
        Ok(signature) => Ok(json!(signature.to_string())),
        Err(err) => Err((-32002, format!("Transaction simulation failed: {err}"))),
    }
}

/// Each signature's status, `null` when the runtime has not seen it. Everything it ran is
/// final: there is one fork and no vote.
fn signature_statuses(params: &[Value], chain: &SvmChain) -> Answer {
    let wanted = params.first().and_then(Value::as_array).ok_or((-32602, "missing signatures".to_string()))?;
    let mut statuses = Vec::with_capacity(wanted.len());
    for signature in wanted {
        let signature: Signature =
            param(Some(signature), "signature")?.ok_or((-32602, "a signature is not a string".to_string()))?;
        let status = chain.svm().get_transaction(&signature).map(|result| {
            let err = match result {
                Ok(_) => Value::Null,
                Err(failed) => serde_json::to_value(&failed.err).unwrap_or_else(|err| json!(err.to_string())),
            };
            let status = if err.is_null() { json!({"Ok": null}) } else { json!({"Err": err}) };
            json!({"slot": chain.slot(), "confirmations": null, "status": status, "err": err, "confirmationStatus": "finalized"})
        });
        statuses.push(status.unwrap_or(Value::Null));
    }
    Ok(in_context(chain, Value::Array(statuses)))
}

/// An account with its data in base64, whatever encoding was asked for (a client decodes
/// by the tag it is given).
fn account_info(params: &[Value], chain: &SvmChain) -> Answer {
    let address: Pubkey = required(params, "address")?;
    let account = chain.svm().get_account(&address).filter(|account| account.lamports > 0);
    let value = account.map(|account| {
        json!({
            "lamports": account.lamports,
            "owner": account.owner.to_string(),
            "data": [base64::engine::general_purpose::STANDARD.encode(&account.data), "base64"],
            "executable": account.executable,
            "rentEpoch": account.rent_epoch,
            "space": account.data.len(),
        })
    });
    Ok(in_context(chain, value.unwrap_or(Value::Null)))
}

/// An SPL token account's balance, with its mint's decimals.
fn token_account_balance(params: &[Value], chain: &SvmChain) -> Answer {
    let address: Pubkey = required(params, "address")?;
    let svm = chain.svm();
    let not_a_token_account = || (-32602, format!("Invalid param: {address} is not a token account"));
    let account = svm.get_account(&address).filter(|account| account.lamports > 0).ok_or_else(not_a_token_account)?;
    if account.owner != super::plan::TOKEN_PROGRAM_ID || account.data.len() < 72 {
        return Err(not_a_token_account());
    }
    let mint = Pubkey::try_from(&account.data[..32]).map_err(|_| not_a_token_account())?;
    let amount = super::plan::token_account_amount(&account.data).ok_or_else(not_a_token_account)?;
    // A mint's decimals are its 45th byte (after the authority option and the supply).
    let decimals = svm.get_account(&mint).and_then(|mint| mint.data.get(44).copied()).unwrap_or(0);
    drop(svm);
    let ui = amount as f64 / 10f64.powi(i32::from(decimals));
    let ui_string = if decimals == 0 {
        amount.to_string()
    } else {
        let digits = format!("{amount:0>width$}", width = usize::from(decimals) + 1);
        let (whole, fraction) = digits.split_at(digits.len() - usize::from(decimals));
        let fraction = fraction.trim_end_matches('0');
        if fraction.is_empty() {
            whole.to_string()
        } else {
            format!("{whole}.{fraction}")
        }
    };
    Ok(in_context(
        chain,
        json!({"amount": amount.to_string(), "decimals": decimals, "uiAmount": ui, "uiAmountString": ui_string}),
    ))
}

fn param<T: std::str::FromStr>(value: Option<&Value>, what: &str) -> Result<Option<T>, (i64, String)> {
    match value.and_then(Value::as_str) {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| (-32602, format!("invalid {what}: {text:?}"))),
    }
}

/// The first parameter, parsed.
fn required<T: std::str::FromStr>(params: &[Value], what: &str) -> Result<T, (i64, String)> {
    param(params.first(), what)?.ok_or((-32602, format!("missing {what}")))
}

/// Newest first: those before `before` (exclusive) and after `until` (exclusive), at most
/// `limit`.
fn signatures_for_address(params: &[Value], chain: &SvmChain) -> Answer {
    let address: Pubkey = required(params, "address")?;
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
    let wanted: Signature = required(params, "signature")?;
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
