"""Config loading and validation, including every committed config file."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO, assert_user_error, run_cli

from lora_project.config import (
    SECTIONS,
    RunConfig,
    build_config,
    explain,
    flatten,
    load_config,
    merge_sources,
    read_yaml,
)
from lora_project.data.catalog import load_catalog, parse_catalog
from lora_project.errors import ConfigError, UserError


def test_every_committed_yaml_config_loads():
    files = sorted((REPO / "config").glob("*.yaml"))
    assert {f.name for f in files} == {"training_config.yaml", "model_config.yaml", "story_themes.yaml"}
    for f in files:
        if f.name == "story_themes.yaml":  # prompts for generate-data --kind stories, not a run config
            from lora_project.data.stories import StoryPrompts

            assert StoryPrompts.load(f).default_stories >= 1
            continue
        cfg = load_config([f])
        assert isinstance(cfg, RunConfig)
    both = load_config([REPO / "config" / "model_config.yaml", REPO / "config" / "training_config.yaml"])
    assert both.lora.target_modules == ["auto"]  # q_proj, v_proj on the embedded Llama (test_model_math)
    assert both.model.trust_remote_code is False


def test_committed_yaml_sets_only_known_fields_and_documents_them():
    """Each committed YAML value is a real field; and the YAML mentions every field of its sections."""
    for name, sections in (("model_config.yaml", ("model", "lora")),
                           ("training_config.yaml", ("training", "tracking", "cluster"))):
        data = read_yaml(REPO / "config" / name)
        assert set(data) == set(sections)
        for section in sections:
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            assert set(data[section]) == fields, (name, section, fields ^ set(data[section]))


def test_committed_catalog_loads():
    catalog = load_catalog(REPO / "config" / "dataset_catalog.csv")
    assert {"toddler_data", "kids"} <= set(catalog)
    assert catalog["toddler_data"].kind == "generated"
    assert abs(sum(catalog["toddler_data"].split) - 1) < 1e-9


def test_overrides_win_and_values_are_parsed_as_yaml():
    cfg = load_config([REPO / "config" / "training_config.yaml"],
                      ["training.lr=2e-4", "lora.r=16", "lora.target_modules=[q_proj, k_proj]",
                       "training.gradient_checkpointing=true"])
    assert cfg.training.lr == pytest.approx(2e-4)
    assert cfg.lora.r == 16
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.training.gradient_checkpointing is True


def test_all_problems_reported_together_with_field_names_and_did_you_mean():
    with pytest.raises(ConfigError) as exc:
        build_config(merge_sources([], ["training.lrr=1", "lora.r=0", "training.lr=-1",
                                        "training.precision=bf61", "trainin.seed=1",
                                        "training.batch_size=2.5"]))
    msg = str(exc.value)
    assert len(exc.value.problems) == 6
    assert "training.lrr: unknown key (did you mean 'lr'?)" in msg
    assert "lora.r: must be >= 1, got 0" in msg
    assert "training.lr: must be > 0" in msg
    assert "did you mean 'bf16'?" in msg
    assert "unknown section 'trainin' (did you mean 'training'?)" in msg
    assert "training.batch_size: expected an integer" in msg


@pytest.mark.parametrize("override, fragment", [
    ("training.lr=0", "training.lr: must be > 0"),
    ("lora.alpha=0", "lora.alpha: must be > 0"),
    ("lora.dropout=1.5", "lora.dropout: must be <= 0.99"),
    ("training.max_steps=-3", "training.max_steps: must be >= 0"),
    ("training.lr=nan", "training.lr"),
    ("lora.target_modules=[]", "lora.target_modules: expected a non-empty list"),
    ("training.schedule=cosin", "did you mean 'cosine'?"),
    ("model.source=null", "model.source: must be set"),
    ("tracking.mlflow=maybe", "tracking.mlflow: expected true or false"),
    ("training.loss_chunk_tokens=-1", "training.loss_chunk_tokens: must be >= 0"),
    ("training.loss_chunk_tokens=3", "training.loss_chunk_tokens: 0 (automatic) or at least 16, got 3"),
])
def test_out_of_range_values(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config([], [override])
    assert fragment in str(exc.value)


def test_warmup_longer_than_run_is_rejected():
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config([], ["training.max_steps=5", "training.warmup_steps=10"])


def test_malformed_yaml_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: [1, 2\n  seed: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml:.*line \d+.*malformed YAML"):
        load_config([bad])


@pytest.mark.parametrize("content, fragment", [
    (b"- just\n- a list\n", "expected a mapping"),
    (b"\x00\x01\x02binary", "binary"),
    (b"\xff\xfe\xfa not utf8", "not UTF-8"),
    (b"training: 5\n", "training: expected a mapping"),
])
def test_bad_yaml_files(tmp_path, content, fragment):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    with pytest.raises(UserError) as exc:
        load_config([f])
    assert fragment in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])


def test_yaml_is_read_with_safe_load(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("training: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_config([f])


def test_explain_documents_every_field_and_flatten():
    text = explain()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"  {f.name}:" in text
            assert f.metadata["doc"], f"{section}.{f.name} has no doc"
    flat = flatten(RunConfig().to_dict())
    assert flat["lora.r"] == 8 and flat["training.seed"] == 42


def test_catalog_problems_reported_with_row_numbers():
    text = ("name,kind,location,split,options,colour\n"
            "a,generated,x.yaml,0.8/0.1/0.1,seed=1,\n")
    with pytest.raises(UserError, match="unknown column 'colour'"):
        parse_catalog(text)
    text = ("name,kind,location,split,options,enabled\n"
            "a,generated,x.yaml,0.8/0.1/0.1,seed=1,true\n"
            "a,local,y.txt,0.5/0.5,,true\n"
            "../evil,lokal,z.txt,,sed=3,maybe\n")
    with pytest.raises(UserError) as exc:
        parse_catalog(text, "cat.csv")
    msg = str(exc.value)
    assert "cat.csv row 3: duplicate name 'a' (first on row 2)" in msg
    assert "cat.csv row 3: split '0.5/0.5'" in msg
    assert "cat.csv row 4: invalid name '../evil'" in msg
    assert "row 4: kind 'lokal'" in msg and "did you mean 'local'" in msg
    assert "row 4: unknown option 'sed' (did you mean 'seed'?)" in msg
    assert "row 4: enabled must be true or false" in msg


def test_yaml_alias_bomb_refused_and_long_values_cut(tmp_path):
    from lora_project.config import load_config, parse_override, safe_load_yaml

    levels = ["x: &a [1,1,1,1,1,1,1,1,1]"] + [
        f"l{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(6)]
    bomb = "\n".join(levels)  # 9^7 = 4.8 million values from a few hundred bytes
    assert len(bomb) < 400
    with pytest.raises(UserError, match="alias bomb"):
        parse_override("training.lr=" + bomb)
    cfg_file = tmp_path / "bomb.yaml"
    cfg_file.write_text("training:\n  note: " + bomb.replace("\n", "\n    ").replace("x:", "\n    x:", 1))
    with pytest.raises(UserError, match="alias bomb"):
        load_config([cfg_file])
    assert safe_load_yaml("a: &x {r: 8}\nb: *x") == {"a": {"r": 8}, "b": {"r": 8}}  # ordinary anchors work
    with pytest.raises(UserError) as err:
        load_config([], ["training.precision=" + "z" * 1_000_000])
    assert len(str(err.value)) < 400 and "chars]" in str(err.value)


def test_seed_beyond_machine_range_is_refused():
    from lora_project.config import load_config

    with pytest.raises(UserError, match="training.seed: must be <="):
        load_config([], [f"training.seed={2**64}"])
    assert load_config([], [f"training.seed={2**63 - 1}"]).training.seed == 2**63 - 1


def test_config_command_prints_the_resolved_config_and_explains(project):
    import yaml

    proc = run_cli("config", "--set", "training.lr=0.5", cwd=project)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["training"]["lr"] == 0.5 and shown["training"]["max_steps"] == 6  # override + project file
    proc = run_cli("config", "--explain", cwd=project)
    assert proc.returncode == 0 and proc.stdout.rstrip("\n") == explain()
    assert_user_error(run_cli("config", "--set", "training.sed=1", cwd=project), "did you mean 'seed'")


def test_yaml_errors_do_not_suggest_an_encoding_option(tmp_path):
    from lora_project.config import load_config

    f = tmp_path / "u16.yaml"
    f.write_bytes("training:\n  lr: 0.1\n".encode("utf-16"))
    with pytest.raises(UserError) as err:
        load_config([f])
    assert "binary" in str(err.value) and "--encoding" not in str(err.value)


def test_many_config_problems_stay_one_short_line():
    from lora_project.errors import ConfigError

    problems = [f"training.field_{i}: must be at least 1, got {-i} (a long explanation of the bound)" for i in range(20)]
    msg = str(ConfigError(problems, "c.yaml"))
    assert msg.startswith("c.yaml: training.field_0:") and len(msg) <= 600
    shown = msg.count("training.field_")
    assert 1 <= shown < 20 and msg.endswith(f"and {20 - shown} more problem(s)")
    assert str(ConfigError(["one problem"])) == "one problem"
