//! The cluster simulator's parts (see `ionet_benches::sim`):
//!
//!   ionet-sim head --dir D
//!   ionet-sim fleet --address A --token-file F --nodes N [--view-nodes K] [--fleet I]

use std::path::PathBuf;

fn flag(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|index| args.get(index + 1))
        .cloned()
        .ok_or_else(|| format!("{name} is required"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("head") => flag(&args, "--dir").and_then(|dir| ionet_benches::sim::serve_head(&PathBuf::from(dir))),
        Some("fleet") => (|| {
            let nodes = flag(&args, "--nodes")?.parse().map_err(|_| "--nodes takes a count".to_string())?;
            let views = match flag(&args, "--view-nodes") {
                Ok(text) => text.parse().map_err(|_| "--view-nodes takes a count".to_string())?,
                Err(_) => nodes,
            };
            let (address, token_file) = (flag(&args, "--address")?, PathBuf::from(flag(&args, "--token-file")?));
            let fleet = match flag(&args, "--fleet") {
                Ok(text) => text.parse().map_err(|_| "--fleet takes a number".to_string())?,
                Err(_) => 0,
            };
            ionet_benches::sim::run_fleet(&address, &token_file, nodes, views, fleet)
        })(),
        _ => Err(concat!(
            "usage: ionet-sim head --dir D | ",
            "ionet-sim fleet --address A --token-file F --nodes N [--view-nodes K] [--fleet I]"
        )
        .into()),
    };
    if let Err(why) = outcome {
        eprintln!("ionet-sim: {why}");
        std::process::exit(1);
    }
}
