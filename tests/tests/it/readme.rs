//! The examples of the README and of the docs pages that show commands work
//! when pasted: every `keywave` and `keywave-coordinator` command in them
//! parses with the real CLI definitions, their campaign commands validate
//! into the intended spec, and the README's CSV inventory imports.

use clap::Parser;
use keywave_cli::args::{CampaignCommand, Cli, Command};
use keywave_common::wire::{OnFailure, Strategy, TargetKind, WaveSize};
use keywave_coordinator::config::DaemonArgs;
use keywave_coordinator::inventory::{parse_reader, Format};

/// The pages whose examples are checked: the README and every docs page
/// that shows `keywave` commands. (docs/inventory.md is not among them: its
/// campaign example uses another spec and it has a CSV example of its own.)
const PAGES: &[(&str, &str)] = &[
    ("README.md", include_str!("../../../README.md")),
    (
        "docs/tutorial.md",
        include_str!("../../../docs/tutorial.md"),
    ),
    (
        "docs/campaigns.md",
        include_str!("../../../docs/campaigns.md"),
    ),
    (
        "docs/consumers.md",
        include_str!("../../../docs/consumers.md"),
    ),
    (
        "docs/detections.md",
        include_str!("../../../docs/detections.md"),
    ),
    (
        "docs/reconcile.md",
        include_str!("../../../docs/reconcile.md"),
    ),
    (
        "docs/security.md",
        include_str!("../../../docs/security.md"),
    ),
    (
        "docs/observability.md",
        include_str!("../../../docs/observability.md"),
    ),
    (
        "docs/development.md",
        include_str!("../../../docs/development.md"),
    ),
];

/// The bodies of the fenced blocks tagged `lang`, page after page.
fn blocks(lang: &str) -> Vec<&'static str> {
    let fence = format!("```{lang}\n");
    PAGES
        .iter()
        .flat_map(|&(_page, text)| {
            text.split(fence.as_str())
                .skip(1)
                .map(|rest| rest.split("```").next().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Splits a shell line into words: single and double quotes group, `#`
/// outside quotes starts a comment.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for ch in line.chars() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(ch);
                in_word = true;
            }
            (None, '#') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in README line {line:?}");
    if in_word {
        words.push(cur);
    }
    words
}

/// Every command of the `sh` blocks, continuation lines joined and
/// placeholders such as `<campaign-id>` filled in.
fn commands() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for block in blocks("sh") {
        let mut pending = String::new();
        for line in block.lines() {
            let line = line.trim_end();
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let joined = std::mem::take(&mut pending).replace("<campaign-id>", "c-0123456789ab");
            let words = shell_words(&joined);
            if !words.is_empty() {
                out.push(words);
            }
        }
    }
    out
}

#[test]
fn every_cli_example_in_the_readme_parses() {
    let mut checked = 0;
    for words in commands() {
        match words[0].as_str() {
            "keywave" => {
                if let Err(e) = Cli::try_parse_from(&words) {
                    panic!("README example {words:?} does not parse:\n{e}");
                }
                checked += 1;
            }
            "keywave-coordinator" => {
                if let Err(e) = DaemonArgs::try_parse_from(&words) {
                    panic!("README example {words:?} does not parse:\n{e}");
                }
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(
        checked >= 10,
        "only {checked} keywave commands found in the README"
    );
}

#[test]
fn readme_campaign_commands_validate_into_the_intended_spec() {
    let starts: Vec<_> = commands()
        .into_iter()
        .filter(|w| w.len() > 2 && w[0] == "keywave" && w[1] == "campaign" && w[2] == "start")
        .collect();
    assert!(!starts.is_empty());
    for words in &starts {
        let cli = Cli::try_parse_from(words).unwrap();
        let Command::Campaign(CampaignCommand::Start(args)) = cli.command else {
            panic!("{words:?} is not campaign start");
        };
        let spec = args
            .spec
            .to_spec()
            .unwrap_or_else(|e| panic!("{words:?}: {e}"));
        // The example every page of keywave uses.
        assert_eq!(spec.selector.regions, vec!["eu".to_string()]);
        assert_eq!(spec.selector.tags, vec!["env=prod".to_string()]);
        assert_eq!(spec.strategy, Strategy::Continuity);
        assert_eq!(
            spec.waves,
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(10.0),
                WaveSize::Percent(50.0)
            ]
        );
        assert_eq!(spec.failure_budget, 0.05);
        assert_eq!(spec.on_failure, OnFailure::Rollback);
        assert_eq!(spec.bake_ms, 30_000);
        assert_eq!(spec.task_timeout_ms, 60_000);
    }
}

#[test]
fn readme_csv_inventory_imports() {
    let csv = blocks("csv");
    assert_eq!(csv.len(), 1, "one CSV example");
    let creds = parse_reader(Format::Csv, csv[0].as_bytes()).unwrap();
    assert_eq!(creds.len(), 2);
    let db = &creds[0];
    assert_eq!(db.id, "billing-db-app");
    assert_eq!(db.kind, TargetKind::Postgres);
    assert_eq!(db.tags, vec!["env=prod", "team=billing"]);
    assert_eq!(db.consumers, vec!["billing-api", "billing-cron"]);
    assert_eq!(creds[1].kind, TargetKind::Redis);
}
