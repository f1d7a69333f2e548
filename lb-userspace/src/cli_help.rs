//! A check for the binaries' tests: every subcommand and argument of a
//! clap command tree says what it is in `--help`.

/// Panics naming the first subcommand without a description or argument
/// without help text (hidden arguments, help and version aside).
pub fn assert_documented(cmd: &clap::Command, path: &str) {
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
            continue;
        }
        assert!(
            arg.get_help().is_some(),
            "{path} {}: no help text",
            arg.get_id()
        );
    }
    for sub in cmd.get_subcommands() {
        let name = format!("{path} {}", sub.get_name());
        if sub.get_name() != "help" {
            assert!(sub.get_about().is_some(), "{name}: no description");
        }
        assert_documented(sub, &name);
    }
}
