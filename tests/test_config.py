"""RunConfig: YAML in, typed config out; bad input fails at load time naming the field."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from k1rl.config import ConfigError, RunConfig, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_cpu.yaml"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_yaml_text(text)
    return str(info.value)


def test_empty_text_gives_documented_defaults():
    cfg = RunConfig.from_yaml_text("")
    assert cfg == RunConfig()
    assert cfg.trainer.tp == 1 and cfg.trainer.dist_backend == "gloo"
    assert cfg.rollout.n == 8 and cfg.rollout.max_tokens == 64
    assert cfg.weights.transport == "mooncake" and cfg.weights.verify == "checksum"
    assert cfg.checkpoint_engine.engine_lifecycle == "restart"


def test_every_field_is_documented():
    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(RunConfig, "")


def test_example_config_loads_and_matches_defaults_of_main_fields():
    cfg = load_config(EXAMPLE)
    assert cfg.run_id == "tiny-cpu"
    assert cfg.trainer == RunConfig().trainer
    assert cfg.rollout == RunConfig().rollout
    assert cfg.weights == RunConfig().weights


def test_bad_value_names_dotted_path_value_and_reason(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  tp: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "trainer.tp: 0" in msg and "greater than or equal to 1" in msg
    assert info.value.problems == ["trainer.tp: 0 — input should be greater than or equal to 1"]


def test_every_bad_field_is_reported_at_once():
    msg = _error("trainer: {lr: -1}\nrollout: {top_p: 1.5}\nmodel: {dtype: float64}")
    assert "trainer.lr: -1" in msg
    assert "rollout.top_p: 1.5" in msg
    assert "model.dtype: 'float64'" in msg and "'float32' or 'bfloat16'" in msg


def test_unknown_key_is_rejected_with_its_path_and_the_allowed_keys():
    msg = _error("trainer:\n  tensor_parallel: 2\n")
    assert "trainer.tensor_parallel: unknown key" in msg
    assert "tp" in msg and "dist_backend" in msg
    assert "top_level_typo: unknown key" in _error("top_level_typo: 1")


def test_strings_are_not_coerced_into_numbers():
    assert "trainer.tp: '2'" in _error("trainer: {tp: '2'}")


def test_exponent_floats_parse_as_numbers():
    assert RunConfig.from_yaml_text("trainer: {lr: 3e-4}").trainer.lr == pytest.approx(3e-4)


def test_yaml_syntax_error_reports_line():
    msg = _error("seed: 1\ntrainer:\n  tp: [1, 2\n  lr: 0.1\n")
    assert "YAML syntax error at line" in msg


def test_duplicate_yaml_key_is_an_error_not_last_wins():
    msg = _error("seed: 1\nseed: 2\n")
    assert "duplicate key 'seed'" in msg and "line 2" in msg


def test_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in _error("- trainer\n- rollout\n")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.yaml")


def test_cpu_trainer_requires_gloo_but_cuda_allows_either():
    assert "trainer.dist_backend: 'nccl'" in _error("trainer: {device: cpu, dist_backend: nccl}")
    for backend in ("nccl", "gloo"):
        cfg = RunConfig.from_yaml_text(f"trainer: {{device: cuda, dist_backend: {backend}}}")
        assert cfg.trainer.dist_backend == backend


def test_a_whole_trajectory_must_fit_one_training_row_at_load_time():
    msg = _error("trainer: {seq_length: 256}\nrollout: {max_model_len: 512}")
    assert "trainer.seq_length: 256 is below rollout.max_model_len (512)" in msg
    assert RunConfig.from_yaml_text("trainer: {seq_length: 256}\nrollout: {max_model_len: 256}")


def test_max_tokens_must_fit_in_the_context():
    msg = _error("rollout: {max_model_len: 128, max_tokens: 128}")
    assert "rollout.max_tokens: 128" in msg and "max_model_len (128)" in msg
    assert RunConfig.from_yaml_text("rollout: {max_model_len: 128, max_tokens: 127}")


@pytest.mark.parametrize(
    "address, ok",
    [
        ("tcp://127.0.0.1:6000", True),
        ("tcp://trainer-svc.k1rl.svc:5701", True),
        ("tcp://[::1]:6000", True),
        ("ipc:///tmp/k1rl-trainer.sock", True),
        ("http://127.0.0.1:6000", False),
        ("tcp://127.0.0.1", False),
        ("tcp://127.0.0.1:0", False),
        ("tcp://127.0.0.1:99999", False),
    ],
)
def test_service_addresses_are_checked(address, ok):
    text = f"reward: {{address: '{address}'}}"
    if ok:
        assert RunConfig.from_yaml_text(text).reward.address == address
    else:
        assert f"reward.address: '{address}'" in _error(text)


def test_two_services_on_one_address_is_an_error():
    msg = _error("reward: {address: 'tcp://127.0.0.1:5701'}")
    assert "reward.address" in msg and "same as trainer.address" in msg


def test_dump_then_load_round_trips(tmp_path):
    cfg = RunConfig.from_yaml_text(
        "run_id: rt\nseed: 7\ntrainer: {lr: 2.5e-5, tp: 2}\n"
        "weights: {transport: shm, rdma_device: 'mlx5_0,mlx5_1'}\n"
        "rollout: {temperature: 0.7, in_process: false}\n"
    )
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.dump_yaml())
    assert load_config(path) == cfg
    assert load_config(path).trainer.lr == 2.5e-5


def test_task_weights_split_an_iterations_prompts_by_largest_remainder():
    rl = RunConfig.from_yaml_text(
        "rl: {tasks: [add:2, sub:2, code:1], task_weights: [31, 31, 2], "
        "prompts_per_iteration: 64}").rl
    assert rl.prompt_counts() == [31, 31, 2]
    rl = rl.model_copy(update={"prompts_per_iteration": 10})
    assert rl.prompt_counts() == [5, 5, 0]  # 4.84, 4.84, 0.31: the two largest remainders
    assert RunConfig.from_yaml_text("rl: {tasks: [add:2]}").rl.prompt_counts() is None


@pytest.mark.parametrize(("rl", "message"), [
    ("{tasks: [add:2, sub:2], task_weights: [1]}", "1 weights for 2 tasks"),
    ("{tasks: [add:2, sub:2], task_weights: [1, 0]}", "must all be > 0"),
    ("{tasks: [add:2], eval_tasks: [sub:2]}", "not in tasks: ['sub:2']"),
    ("{tasks: [add:2], eval_tasks: []}", "non-empty subset"),
])
def test_bad_task_mixes_are_refused(rl, message):
    assert message in _error(f"rl: {rl}")


def test_evaluated_levels_default_to_every_rl_level():
    assert RunConfig.from_yaml_text("rl: {tasks: [add:2, code:1]}").rl.headline_tasks == \
        ["add:2", "code:1"]
    assert RunConfig.from_yaml_text(
        "rl: {tasks: [add:2, code:1], eval_tasks: [add:2]}").rl.headline_tasks == ["add:2"]


def test_the_partial_rollout_example_turns_every_part_on():
    cfg = load_config(EXAMPLE.with_name("partial_rollouts.yaml"))
    assert cfg.rollout.max_tokens < cfg.rollout.max_response_tokens < cfg.rollout.max_model_len
    assert cfg.rollout.repetition.enabled and cfg.reward.repetition_penalty > 0
    assert (cfg.trainer.segments, cfg.rl.sampler) == ("recent", "prioritized")
    assert all(t.startswith("count:") for t in cfg.rl.tasks)


def test_overrides_set_dotted_keys_with_yaml_values():
    from k1rl.yaml_config import with_overrides

    cfg = with_overrides(RunConfig(), ["rl.iterations=3", "trainer.lr=2e-4",
                                       "trainer.loss={name: grpo}", "rl.tasks=[add:1, sub:1]"])
    assert cfg.rl.iterations == 3
    assert cfg.trainer.lr == 2e-4
    assert cfg.trainer.loss.name == "grpo"
    assert cfg.rl.tasks == ["add:1", "sub:1"]


@pytest.mark.parametrize(("pair", "message"), [
    ("rl.iterations", "want KEY=VALUE"),
    ("rl.iterations=0", "rl.iterations: 0 — input should be greater than or equal to 1"),
    ("rl.nope=1", "rl.nope: unknown key (allowed: "),
    ("rl.iterations.x=1", "rl.iterations.x: iterations is a value, not a section"),
    ("trainer.lr=[1", "trainer.lr: YAML syntax error"),
])
def test_a_bad_override_is_a_config_error_naming_it(pair, message):
    from k1rl.yaml_config import with_overrides

    with pytest.raises(ConfigError, match="--set") as err:
        with_overrides(RunConfig(), [pair])
    assert any(p.startswith(message) or message in p for p in err.value.problems), err.value


def test_trainer_layout_errors_name_the_field():
    assert "trainer.nnodes: 2 nodes cannot hold" in _error("trainer: {tp: 3, nnodes: 2}")
    assert "trainer.distributed_optimizer" in _error(
        "trainer: {distributed_optimizer: true, optimizer: sgd}")
    assert "trainer.pp: 0" in _error("trainer: {pp: 0}")
    assert "trainer.sequence_parallel: sequence parallelism splits tokens over the " \
        "tensor-parallel ranks, so it needs trainer.tp > 1" in _error(
            "trainer: {sequence_parallel: true}")
