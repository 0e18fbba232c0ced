//! `junit-merge OUT IN...`: merge the JUnit files of scenario shards into one.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: junit-merge OUT.xml IN.xml...   (merge scenario shards' JUnit files)");
        return std::process::ExitCode::from(2);
    }
    let mut inputs = Vec::new();
    for path in &args[1..] {
        match std::fs::read_to_string(path) {
            Ok(s) => inputs.push(s),
            Err(e) => {
                eprintln!("error: cannot read {path}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    match scenarios::merge_junit(&inputs).map_err(|e| e.to_string()) {
        Ok(xml) => match std::fs::write(&args[0], xml) {
            Ok(()) => {
                println!("merged {} file(s) into {}", inputs.len(), args[0]);
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot write {}: {e}", args[0]);
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
