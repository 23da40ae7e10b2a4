//! `editguard mine` and `editguard shrink` on the real default model.
//!
//! The mine runs as the binary a user runs, over three COUNTERFACT-train records whose single ROME edits were
//! measured before (Xbox → Dodge holds at 1.14×, Canada → FIFA collapses at 3.1×, Ireland → Antarctica holds at
//! 1.07×); it is killed after its first record and started again, and must resume without redoing a record, keep
//! exactly the collapsing record, and write a suite whose test the harness lists and whose verdict passes. The
//! shrink reduces a collapsing sequential run of four edits to the one edit that collapses it and runs the
//! reproducer again.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use editguard::cases::Outcome;
use editguard::harness::execute::measure_edits;
use editguard::harness::trial::plan;
use editguard::harness::verdict::meets;
use editguard::harness::{HarnessContext, TrialKind};
use editguard::shrink::{ShrinkTarget, shrink, suite_text};

use crate::support::root;

fn mine_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_editguard"));
    command
        .current_dir(root())
        .env("EDITGUARD_MODELS", root().join("models.toml"))
        .args(["mine", "--dataset", "counterfact-train", "--ids", "4790,12714,6130", "--screen", "off", "--tier"])
        .arg("default")
        .arg("--out")
        .arg(dir.join("cases").join("mined.toml"))
        .arg("--journal")
        .arg(dir.join("journal.jsonl"));
    command
}

fn journal_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.matches('\n').count()).unwrap_or(0)
}

#[test]
fn a_killed_mine_resumes_without_redoing_records_and_keeps_exactly_the_collapse() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("cases")).unwrap();
    let journal = dir.path().join("journal.jsonl");

    let mut first = mine_command(dir.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while journal_lines(&journal) < 2 {
        assert!(first.try_wait().unwrap().is_none(), "the mine ended before it was killed");
        assert!(started.elapsed() < Duration::from_secs(600), "no record was journaled in 10 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let before = std::fs::read_to_string(&journal).unwrap();
    let settled = before.matches('\n').count() - 1;
    assert!((1..3).contains(&settled), "killed after {settled} records");

    let output = mine_command(dir.path()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("{settled} of 3 records already done")), "{stderr}");
    let after = std::fs::read_to_string(&journal).unwrap();
    assert!(after.starts_with(before.trim_end_matches(|c| c != '\n')), "journaled lines were rewritten");
    let ids: Vec<String> = after
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["4790", "12714", "6130"], "each record once, in order");
    assert!(stdout.contains("collapses   1 found; rate 1 of 3 edited"), "{stdout}");

    let context = HarnessContext::new(&root(), &root().join("models.toml"), &dir.path().join("cases")).unwrap();
    let mined = context.suites.iter().find(|s| s.name == "mined").expect("the mined suite loads");
    assert_eq!(mined.case_names(), vec!["cft-12714-canada-fifa"]);
    let name = "single::rome::smollm2-135m::mined::cft-12714-canada-fifa";
    let spec = plan(&context.suites).into_iter().find(|s| s.name == name).expect("the harness lists the mined test");
    assert!(!spec.heavy, "written in the default tier as asked");
    let TrialKind::Edit { method, model, case, .. } = &spec.kind else { panic!("an edit test") };
    assert_eq!(mined.expected(method, model, case).0, Outcome::Collapse);
    let run = measure_edits(&context, mined, method, model, case, None).unwrap();
    meets(&run.findings, Outcome::Collapse).expect("the mined suite's verdict passes");
}

#[test]
fn shrink_reduces_a_collapsing_sequential_run_to_the_edit_that_collapses_it() {
    let cases = tempfile::tempdir().unwrap();
    std::fs::write(
        cases.path().join("four.toml"),
        r#"
description = "four kept rome edits; the third collapses the model on its own"
setting = "sequential"
methods = ["rome"]
check_every = 2

[[cases]]
name = "xbox-product"
prompt = "Xbox is a product of"
subject = "Xbox"
target_new = "Dodge"
ground_truth = "Microsoft"

[[cases]]
name = "minecraft-creator"
prompt = "Minecraft, created by"
subject = "Minecraft"
target_new = "IBM"
ground_truth = "Microsoft"

[[cases]]
name = "canada-nato"
prompt = "Canada is a part of the"
subject = "Canada"
target_new = "FIFA"
ground_truth = "NATO"

[[cases]]
name = "ireland-in"
prompt = "Ireland is in"
subject = "Ireland"
target_new = "Antarctica"
ground_truth = "Europe"
"#,
    )
    .unwrap();
    let context = HarnessContext::new(&root(), &root().join("models.toml"), cases.path()).unwrap();
    let target = ShrinkTarget { suite: context.suites[0].clone(), method: "rome".into(), model: "smollm2-135m".into() };
    let mut lines = Vec::new();
    let report = shrink(&context, &target, &mut |line| lines.push(line.to_string())).unwrap();
    println!("{}", lines.join("\n"));
    assert!(
        report.collapsed_at <= 4 && report.collapsed_at.is_multiple_of(2),
        "checked every 2: {}",
        report.collapsed_at
    );
    let ids: Vec<&str> = report.minimal.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["canada-nato"], "{}", lines.join("\n"));
    assert!(report.runs >= 3 && report.minimal_ppl > 2.0 * report.baseline_ppl);

    let shrunk = tempfile::tempdir().unwrap();
    let path = shrunk.path().join("shrunk.toml");
    std::fs::write(&path, suite_text(&target, &report).unwrap()).unwrap();
    let context = HarnessContext::new(&root(), &root().join("models.toml"), shrunk.path()).unwrap();
    let suite = &context.suites[0];
    assert_eq!(suite.trial_cases(), vec!["n1"]);
    let expected = suite.expected("rome", "smollm2-135m", "n1").0;
    assert_eq!(expected, Outcome::Collapse);
    let run = measure_edits(&context, suite, "rome", "smollm2-135m", "n1", None).unwrap();
    meets(&run.findings, expected).expect("the reproducer collapses again");
}
