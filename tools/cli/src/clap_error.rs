//! What every tool does with a command line clap refuses: help and version as clap prints
//! them, an error as one line `TOOL: what is wrong; see 'TOOL VERB --help'`, exit 2.

/// Reports a clap outcome for `tool` and returns the exit status. `verb` is the verb given on
/// the command line, if known (the usage line names it otherwise).
pub fn clap_exit(tool: &str, e: &clap::Error, verb: Option<&str>) -> i32 {
    use clap::error::ErrorKind as K;
    match e.kind() {
        K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            e.exit_code()
        }
        _ => {
            eprintln!("{tool}: {}", clap_one_line(tool, e, verb));
            2
        }
    }
}

/// A clap error on one line, ending with where to find help, e.g. `unexpected argument '--x'
/// found; see 'tap-ctl create --help'`.
pub fn clap_one_line(tool: &str, e: &clap::Error, verb: Option<&str>) -> String {
    let text = e.render().to_string();
    let mut msg = String::new();
    let mut command = match verb {
        Some(v) => format!("{tool} {v}"),
        None => tool.to_owned(),
    };
    for line in text.lines().map(str::trim) {
        if let Some(usage) = line.strip_prefix("Usage:") {
            let words: Vec<&str> = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect();
            if !words.is_empty() {
                command = words.join(" ");
            }
            break;
        }
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if msg.is_empty() {
            msg.push_str(line);
        } else if line.starts_with("tip:") {
            msg.push_str("; ");
            msg.push_str(line);
        } else {
            msg.push(' ');
            msg.push_str(line);
        }
    }
    format!("{msg}; see '{command} --help'")
}
