//! Suite parsing and validation against a tiny registry: names, settings, expectations and the errors that name
//! file, line and field.

use super::*;

const REGISTRY: &str = r#"
default_model = "tiny"

[thresholds]
collapse_ppl = 1000.0
collapse_ratio = 2.0
min_efficacy = 0.5
task_tolerance = 0.05
baseline_tolerance = 1e-4
drift_tolerance = 0.02

[models.tiny]
architecture = "llama"
source = { kind = "path", weights = ["tiny.safetensors"], config = "config.json", tokenizer = "tokenizer.json" }

[models.tiny.methods.ft-l-inf]
layers = [0]
lr = 5e-4
num_steps = 25
batch_size = 128
norm_constraint = 5e-4
objective_optimization = "prompt_last"

[models.tiny.methods.memit]
layers = [0]
v_num_grad_steps = 25
v_lr = 0.5
v_loss_layer = 1
v_weight_decay = 0.5
clamp_norm_factor = 0.75
kl_factor = 0.0625
mom2_update_weight = 15000.0
mom2_n_samples = 2000
context_template_length_params = [[10, 5]]
seed = 0
"#;

const CASE: &str = r#"
[[cases]]
name = "darrieux"
prompt = "The mother tongue of Danielle Darrieux is"
subject = "Danielle Darrieux"
target_new = "English"
ground_truth = "French"

[[cases]]
name = "tesla"
prompt = "{}'s founder is"
subject = "Tesla"
target_new = "Gates"
"#;

fn parse(text: &str) -> Result<Suite> {
    let registry = Registry::parse(REGISTRY, "models.toml", Path::new(".")).unwrap();
    Suite::parse(text, Path::new("cases/demo.toml"), &registry)
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn a_single_suite_names_one_test_per_case() {
    let suite = parse(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\n{CASE}")).unwrap();
    assert_eq!(suite.trial_cases(), ["darrieux", "tesla"]);
    assert_eq!(suite.models, ["tiny"]);
    let requests = suite.requests(None, Some("tesla")).unwrap();
    assert_eq!(requests[0].prompt, "{}'s founder is");
    assert_eq!(suite.expected("ft-l-inf", "tiny", "tesla").0, Outcome::Hold);
}

#[test]
fn multi_edit_suites_are_one_test() {
    let text =
        format!("description = \"d\"\nsetting = \"batch-sequential\"\nmethods = [\"memit\"]\nbatch_size = 1\n{CASE}");
    assert_eq!(parse(&text).unwrap().trial_cases(), ["n2-b1"]);
    let text = format!("description = \"d\"\nsetting = \"sequential\"\nmethods = [\"ft-l-inf\"]\nedits = 1\n{CASE}");
    assert_eq!(parse(&text).unwrap().trial_cases(), ["n1"]);
}

#[test]
fn errors_name_file_line_and_field() {
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\", \"rom\"]\n{CASE}"));
    assert!(e.contains("cases/demo.toml:2") && e.contains("methods[1]") && e.contains("unknown method `rom`"), "{e}");
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\nmodels = [\"huge\"]\n{CASE}"));
    assert!(e.contains("models[0]") && e.contains("huge"), "{e}");
    let e = err(&format!("description = \"d\"\nmethods = [\"ft\"]\n{CASE}"));
    assert!(e.contains("has no hyper-parameters for `ft`"), "{e}");
    let e = err(&format!("description = \"d\"\nsetting = \"batch\"\nmethods = [\"rome\"]\n{CASE}"));
    assert!(e.contains("needs a batch method"), "{e}");
    let e = err(&format!("description = \"d\"\nsetting = \"sequential\"\nmethods = [\"ft-l-inf\"]\nedits = 9\n{CASE}"));
    assert!(e.contains("edits") && e.contains("between 1 and 2"), "{e}");
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\nsetting = \"sometimes\"\n{CASE}"));
    assert!(e.contains("setting"), "{e}");
    let e = err(
        "description = \"d\"\nmethods = [\"ft-l-inf\"]\n[[cases]]\nname = \"x\"\nprompt = \"a b\"\nsubject = \"c\"\ntarget_new = \"d\"\n",
    );
    assert!(e.contains("subject") && e.contains("does not occur"), "{e}");
    let e = err(&format!(
        "description = \"d\"\nmethods = [\"ft-l-inf\"]\n{CASE}\n[[expect]]\noutcome = \"collapse\"\nmethods = [\"ft-l-inf\"]\ncases = [\"nobody\"]\nreason = \"r\"\n"
    ));
    assert!(e.contains("expect[0].cases[0]") && e.contains("nobody"), "{e}");
    let e = err("description = \"d\"\nmethods = [\"ft-l-inf\"]\n[dataset]\nname = \"counterfact\"\nsample = 5\n");
    assert!(e.contains("dataset.sample") && e.contains("ids"), "{e}");
    let e = err(
        "description = \"d\"\nmethods = [\"ft-l-inf\"]\n[[cases]]\nname = \"Bad Name\"\nprompt = \"{} is\"\nsubject = \"x\"\ntarget_new = \"y\"\n",
    );
    assert!(e.contains("cases[0].name"), "{e}");
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\n[thresholds]\ncollapse_ratio = 0.9\n{CASE}"));
    assert!(e.contains("thresholds.collapse_ratio"), "{e}");
}

#[test]
fn expectations_match_method_model_and_case() {
    let text = format!(
        "description = \"d\"\nmethods = [\"ft-l-inf\"]\n{CASE}\n[[expect]]\noutcome = \"collapse\"\nmethods = [\"ft-l-inf\"]\ncases = [\"tesla\"]\nreason = \"measured\"\n"
    );
    let suite = parse(&text).unwrap();
    assert_eq!(suite.expected("ft-l-inf", "tiny", "tesla"), (Outcome::Collapse, Some("measured")));
    assert_eq!(suite.expected("ft-l-inf", "tiny", "darrieux").0, Outcome::Hold);
}

#[test]
fn suites_name_known_tasks_and_a_positive_sample_size() {
    let suite =
        parse(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\ntasks = [\"sst2\", \"lambada\"]\n{CASE}"))
            .unwrap();
    assert_eq!(suite.tasks, ["sst2", "lambada"]);
    assert_eq!((suite.task_items, suite.task_seed), (DEFAULT_TASK_ITEMS, 0));
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\ntasks = [\"sst2\", \"sst3\"]\n{CASE}"));
    assert!(e.contains("cases/demo.toml:3") && e.contains("tasks[1]") && e.contains("unknown task `sst3`"), "{e}");
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\ntasks = [\"sst2\"]\ntask_items = 0\n{CASE}"));
    assert!(e.contains("task_items") && e.contains("at least 1"), "{e}");
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\ntask_items = 5\n{CASE}"));
    assert!(e.contains("task_items") && e.contains("names no `tasks`"), "{e}");
}

#[test]
fn a_case_may_run_in_a_tier_of_its_own_in_single_suites_only() {
    let tiered = CASE.replacen("name = \"tesla\"", "name = \"tesla\"\ntier = \"default\"", 1);
    let suite = parse(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\ntier = \"heavy\"\n{tiered}")).unwrap();
    let tiers = (suite.tier_of("ft-l-inf", "tiny", "tesla"), suite.tier_of("ft-l-inf", "tiny", "darrieux"));
    assert_eq!(tiers, (Tier::Default, Tier::Heavy));
    let specs = crate::harness::trial::plan(std::slice::from_ref(&suite));
    let heavy: Vec<(&str, bool)> = specs.iter().map(|s| (s.name.as_str(), s.heavy)).collect();
    assert!(heavy.contains(&("single::ft-l-inf::tiny::demo::tesla", false)), "{heavy:?}");
    assert!(heavy.contains(&("single::ft-l-inf::tiny::demo::darrieux", true)), "{heavy:?}");
    assert!(heavy.contains(&("baseline::tiny::me-ppl-50", false)), "a default-tier case needs its baseline: {heavy:?}");
    let e = err(&format!("description = \"d\"\nsetting = \"sequential\"\nmethods = [\"ft-l-inf\"]\n{tiered}"));
    assert!(e.contains("cases[1].tier") && e.contains("one tier"), "{e}");
}

#[test]
fn tier_rules_move_selected_tests_and_the_last_match_decides() {
    let registry = REGISTRY.to_string()
        + "\n[models.big]\narchitecture = \"llama\"\n\
           source = { kind = \"path\", weights = [\"big.safetensors\"], config = \"c.json\", tokenizer = \"t.json\" }\n\
           [models.big.methods.ft-l-inf]\nlayers = [0]\nlr = 5e-4\nnum_steps = 25\nbatch_size = 128\n\
           norm_constraint = 5e-4\nobjective_optimization = \"prompt_last\"\n";
    let registry = Registry::parse(&registry, "models.toml", Path::new(".")).unwrap();
    let rules = "[[tiers]]\ntier = \"heavy\"\nmodels = [\"big\"]\n\n\
                 [[tiers]]\ntier = \"default\"\nmodels = [\"big\"]\ncases = [\"tesla\"]\n";
    let text = format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\nmodels = [\"tiny\", \"big\"]\n{CASE}\n{rules}");
    let suite = Suite::parse(&text, Path::new("cases/demo.toml"), &registry).unwrap();
    let tier = |model: &str, case: &str| suite.tier_of("ft-l-inf", model, case);
    let found = (tier("tiny", "darrieux"), tier("big", "darrieux"), tier("big", "tesla"));
    assert_eq!(found, (Tier::Default, Tier::Heavy, Tier::Default));
    let specs = crate::harness::trial::plan(std::slice::from_ref(&suite));
    let heavy: Vec<(&str, bool)> = specs.iter().map(|s| (s.name.as_str(), s.heavy)).collect();
    assert!(heavy.contains(&("single::ft-l-inf::big::demo::darrieux", true)), "{heavy:?}");
    assert!(heavy.contains(&("single::ft-l-inf::big::demo::tesla", false)), "{heavy:?}");
    assert!(heavy.contains(&("baseline::big::me-ppl-50", false)), "a default-tier test needs its baseline: {heavy:?}");
    let stray = text.replace("models = [\"big\"]\ncases", "models = [\"huge\"]\ncases");
    let e = Suite::parse(&stray, Path::new("cases/demo.toml"), &registry).unwrap_err().to_string();
    assert!(e.contains("tiers[1].models[0]") && e.contains("`huge` is not one of"), "{e}");
}

#[test]
fn stop_at_collapse_is_for_kept_settings() {
    let text = format!(
        "description = \"d\"\nsetting = \"sequential\"\nmethods = [\"ft-l-inf\"]\nstop_at_collapse = false\n{CASE}"
    );
    assert!(!parse(&text).unwrap().stop_at_collapse);
    assert!(parse(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\n{CASE}")).unwrap().stop_at_collapse);
    let e = err(&format!("description = \"d\"\nmethods = [\"ft-l-inf\"]\nstop_at_collapse = false\n{CASE}"));
    assert!(e.contains("cases/demo.toml:3") && e.contains("stop_at_collapse"), "{e}");
}
