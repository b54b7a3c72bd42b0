"""Up-front validation: every user error is one clear message and exit code 2 before training.

Each case below crashed with a traceback, or failed only after the data was loaded or the run's
files were written, before ``mtlkit.app.validation`` existed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtlkit import Alternating, Budget, Joint, Trainer
from mtlkit.app.cli import EXIT_USER_ERROR, main
from mtlkit.app.config import load_config, parse_value
from mtlkit.app.validation import check_arguments, matches_type
from mtlkit.architectures import HPS
from mtlkit.data.benchmarks import DATASETS
from mtlkit.errors import ConfigError, MtlkitError
from mtlkit.registry import Registry
from mtlkit.tasks import Task
from mtlkit.training.preflight import sample_batch

TINY = [
    "data_args.n_train=16",
    "data_args.n_val=8",
    "data_args.n_test=8",
    "batch_size=8",
    "steps=1",
    "epochs=null",
    "plots=false",
    "--no-progress",
]


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_user_error(code: int, err: str, message: str) -> None:
    assert code == EXIT_USER_ERROR == 2
    assert err.startswith("mtlkit: error: "), err
    assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        # argument types against the signatures (used to fail inside the factory, or crash)
        (["method=cagrad", "method_args.c=foo"], "method_args.c must be float, got 'foo'"),
        # found by the slow fuzzer: floats beyond float32 overflowed inside torch (RuntimeError)
        (["arch=dselect_k", "arch_args.gamma=1e300"], "arch_args.gamma must be at most 3.403e+38"),
        (["method=imtl_l", "method_args.init=-1e300"], "method_args.init must be at most 3.403e"),
        (["method=upgrad", "method_args.pref_vector=[1, 1e39]"], "pref_vector must be at most"),
        (["method_args.reduction=avg"], "method_args.reduction must be one of 'sum', 'mean'"),
        (["arch_args.widths=foo"], "arch_args.widths must be list[int] or null, got 'foo'"),
        (["data_args.noise=true"], "data_args.noise must be float, got True"),
        (["data_args.noise=.nan"], "noise must be a finite number >= 0, got nan"),
        (["data_args.seed=3"], "data_args must not set seed"),
        (["arch_args.input_shape=[1]"], "arch_args must not set input_shape"),
        (["method_args={1: 2}"], "must map names to values"),
        # groups (TypeError crash; strings iterated as task names)
        (["strategy=alternating", "strategy_args.groups=5"], "strategy_args.groups must be"),
        (
            ["strategy=alternating", "strategy_args.groups=[left,right,sum]"],
            "strategy_args.groups must be str or list[list[str]], got ['left', 'right', 'sum']",
        ),
        (
            ["strategy=alternating", "strategy_args.groups=[[left,foo],[right,sum]]"],
            "groups name unknown task(s) ['foo']; tasks: ['left', 'right', 'sum']",
        ),
        # values
        (["lr=.inf"], "lr must be a finite number"),
        (["weight_decay=.nan"], "weight_decay must be a finite number"),
        (["lr=" + "9" * 400], "too large for a float"),
        (["seed=99999999999999999999999"], "seed must be an integer in [0, 2**32)"),
        (["on_nonfinite=maybe"], "on_nonfinite must be one of raise, skip_step, skip_task"),
        (["device=tpu"], "invalid device 'tpu'"),
        # method x tasks (ValueError tracebacks at the first step)
        (["method=krum"], "method Krum cannot run on 3 task(s)"),
        (["method=constant", "method_args.weights=[1,2]"], "Constant has 2 weights, got 3"),
        (["method=ngdiff"], "NGDiff cannot run on 3 task(s)"),
        (["method=ls", "method_args.weights=[1,2]"], "cannot be set up for the tasks"),
        # method x architecture x route
        (["rep_grad=true", "arch=mmoe"], "rep_grad needs a model with one shared representation"),
        (["rep_grad=true", "method=modo"], "use rep_grad=false"),
        # shapes of outputs vs targets (a RuntimeError deep in cross_entropy at the first step)
        (
            ["arch_args.backbone=segnet"],
            "task 'left': its loss cross_entropy cannot take the model's output tensor of shape "
            "[8, 10, 8, 12] (float32) with the target tensor of shape [8] (int64)",
        ),
    ],
)
def test_bad_configs_are_one_clear_error_with_exit_code_2(tmp_path, capsys, overrides, message):
    code, err = run_cli(["train", *TINY, f"out={tmp_path / 'run'}", *overrides], capsys)
    assert_user_error(code, err, message)
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before any file


def test_cuda_asked_for_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(["train", *TINY, "device=cuda"], capsys)
    assert_user_error(code, err, "device 'cuda' asked for, but CUDA is not available here")


def test_an_output_folder_that_cannot_be_made(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(["train", *TINY, f"out={blocker}"], capsys)
    assert_user_error(code, err, "exists and is not a folder")
    code, err = run_cli(["train", *TINY, f"out={blocker / 'run'}"], capsys)
    assert_user_error(code, err, "cannot create the folder")
    deep = tmp_path / "a" / "b" / "c"
    code, _ = run_cli(["train", *TINY, f"out={deep}", "method=krum"], capsys)
    assert code == 2 and not (tmp_path / "a").exists()  # the probe leaves nothing behind


def test_a_failed_run_leaves_no_new_runs_folder(tmp_path, capsys, monkeypatch):
    """Without out=, the run's folder runs/<name> is made before the claim; a config error found
    with the data (Krum on 3 tasks) removes it again, and the next run takes the same name."""
    monkeypatch.chdir(tmp_path)
    code, _ = run_cli(["train", *TINY, "method=krum"], capsys)
    assert code == 2 and list((tmp_path / "runs").iterdir()) == []
    code, _ = run_cli(["train", *TINY, "method=krum"], capsys)
    assert code == 2 and list((tmp_path / "runs").iterdir()) == []


def test_ctrl_c_outside_training_is_no_traceback(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mtlkit.app.cli.load_problem", interrupted)  # Ctrl-C while loading data
    assert main(["train", *TINY, f"out={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == "mtlkit: interrupted\n"


def test_config_files_that_cannot_be_read(tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    code, err = run_cli(["train", "--config", str(binary)], capsys)
    assert_user_error(code, err, "cannot read config file")
    evil = tmp_path / "evil.yaml"
    evil.write_text("lr: !!python/object/apply:os.system ['echo pwned']\n")
    code, err = run_cli(["train", "--config", str(evil)], capsys)
    assert_user_error(code, err, "is not valid YAML")


def test_exponents_without_a_dot_are_floats():
    # YAML 1.1 reads 1e-3 as a string, which made lr=1e-3 an error
    assert parse_value("1e-3") == 0.001 and parse_value("-2E+2") == -200.0
    assert parse_value("[1e-3, 2]") == [0.001, 2]
    assert parse_value("1e") == "1e" and parse_value("12") == 12
    assert load_config(overrides=["lr=1e-3"]).lr == 0.001


ROOTED = ["nyuv2", "cityscapes", "celeba", "office_31", "office_home", "qm9", "multi_mnist"]


@pytest.mark.parametrize("data", ROOTED)
def test_dataset_roots_name_the_path_and_the_expected_layout(tmp_path, capsys, data):
    missing = tmp_path / "missing"
    code, err = run_cli(["train", f"data={data}", f"data_args.root={missing}"], capsys)
    assert code == 2 and str(missing) in err and "expected layout" in err
    assert "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(["train", f"data={data}", f"data_args.root={empty}"], capsys)
    assert code == 2 and str(empty) in err and "expected layout" in err
    code, err = run_cli(["train", f"data={data}"], capsys)
    assert_user_error(code, err, "needs data_args.root=PATH")


def test_resume_refuses_a_changed_model_and_keeps_the_run_intact(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "checkpoint_every=1", f"out={run}"]) == 0
    capsys.readouterr()
    saved = (run / "config.yaml").read_text()
    for change, key in [
        ("arch=mmoe", "arch"),
        ("tasks=[left]", "tasks"),
        ("method=uw", "method"),
        ("data_args.n_train=8", "data_args"),
        ("batch_size=4", "batch_size"),
    ]:
        code, err = run_cli(["train", "--resume", str(run), change], capsys)
        assert_user_error(code, err, f"--resume cannot change {key}")
        assert (run / "config.yaml").read_text() == saved  # used to be overwritten first
    # the budget and the nonfinite policy may change
    code, _ = run_cli(["train", "--resume", str(run), "steps=2", "on_nonfinite=skip_step"], capsys)
    assert code == 0


def test_resume_with_damaged_logs_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "checkpoint_every=1", f"out={run}"]) == 0
    (run / "steps.csv").write_text("garbage\n")
    code, err = run_cli(["train", "--resume", str(run), "steps=2"], capsys)
    assert_user_error(code, err, "cannot continue the log ")


def test_registry_argument_types():
    registry: Registry[object] = Registry("thing")

    @registry.register("thing")
    def thing(
        a: float = 1.0,
        b: int | None = None,
        c: tuple[int, int] = (1, 2),
        d: list[str] | str = "x",
        e: object = None,
    ) -> object:
        return None

    check_arguments(registry, "thing", {"a": 2, "b": None, "c": [3, 4], "d": ["u"], "e": {}}, "k")
    for bad, message in [
        ({"a": "1"}, "k.a must be float"),
        ({"a": True}, "k.a must be float"),
        ({"b": 1.5}, "k.b must be int or null"),
        ({"c": [1, 2, 3]}, "k.c must be tuple[int, int]"),
        ({"d": [1]}, "k.d must be list[str] or str"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_arguments(registry, "thing", bad, "k")
    assert matches_type("path/to", str) and not matches_type(1, str)


# --------------------------------------------------------------------- the Trainer's checks
def small_problem():
    problem = DATASETS.get("multidigits", n_train=32, n_val=16, n_test=16)
    loader = DataLoader(
        problem.splits["train"],
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
    )
    return problem, loader


def small_model(problem, multi_input=False, **heads):
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.ReLU())
    outputs = heads or {t: nn.Linear(16, k) for t, k in problem.task_outputs.items()}
    return HPS(encoder, outputs, multi_input=multi_input)


def test_multi_input_data_needs_a_multi_input_model_and_back():
    problem, loader = small_problem()
    model = small_model(problem)
    trainer = Trainer(model, problem.tasks, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match=r"multi-input .* single-input model"):
        trainer.fit({t.name: loader for t in problem.tasks})
    model = small_model(problem, multi_input=True)
    trainer = Trainer(model, problem.tasks, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match=r"multi-input model .* one loader"):
        trainer.fit(loader)


def test_dry_forward_checks_outputs_and_losses():
    problem, loader = small_problem()
    missing = small_model(problem, left=nn.Linear(16, 10), right=nn.Linear(16, 10))
    trainer = Trainer(missing, problem.tasks, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match="gives no output for task 'sum'"):
        trainer.fit(loader)
    vector = [*problem.tasks[:2], Task("sum", lambda out, y: (out.squeeze(-1) - y) ** 2)]
    trainer = Trainer(small_model(problem), vector, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match="task 'sum': its loss <lambda> must return one number"):
        trainer.fit(loader)
    wide = small_model(
        problem, left=nn.Linear(16, 10), right=nn.Linear(16, 10), sum=nn.Linear(16, 3)
    )
    trainer = Trainer(wide, problem.tasks, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match=r"task 'sum': sum_loss: .* got \(8, 3\)"):
        trainer.fit(loader)


class OwnShuffle:
    """A user's re-iterable data: it reshuffles on every ``iter()`` with a generator kept under
    a name no library could guess (``self.gen``), and records the orders it drew."""

    def __init__(self, dataset, batch_size=8, seed=5):
        self.dataset, self.batch_size = dataset, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.orders = []

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=self.gen)
        self.orders.append(order)
        for start in range(0, len(order), self.batch_size):
            rows = [self.dataset[int(i)] for i in order[start : start + self.batch_size]]
            x = torch.stack([r[0] for r in rows])
            yield x, {t: torch.stack([torch.as_tensor(r[1][t]) for r in rows]) for t in rows[0][1]}


class Seen(Joint):
    """Joint that records the inputs of every batch it steps on."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def step(self, batch, compute_losses, step):
        self.inputs.append(batch[0].clone())
        return super().step(batch, compute_losses, step)


def test_the_checks_do_not_touch_a_users_iterable():
    """The first epoch trains on the iterable's first shuffle: the pre-flight check does not
    iterate the training data (it reshuffled it before, when its generator had another name
    than the known ones), and a model that does not fit still fails before any step."""
    problem, _ = small_problem()
    data = OwnShuffle(problem.splits["train"])
    strategy = Seen()
    torch.manual_seed(0)
    trainer = Trainer(small_model(problem), problem.tasks, strategy, budget=Budget(steps=3),
                      progress=False)  # fmt: skip
    trainer.validate(data)  # what the CLI does before training: no batch is drawn
    assert data.orders == []
    trainer.fit(data)
    assert len(data.orders) == 1  # one shuffle for one epoch
    twin = OwnShuffle(problem.splits["train"])  # the same generator, untouched
    expected = [x for x, _ in twin][:3]
    assert len(strategy.inputs) == 3
    for got, want in zip(strategy.inputs, expected):
        assert torch.equal(got, want)

    missing = small_model(problem, left=nn.Linear(16, 10), right=nn.Linear(16, 10))
    refused = Seen()
    trainer = Trainer(missing, problem.tasks, refused, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match="gives no output for task 'sum'"):
        trainer.fit(OwnShuffle(problem.splits["train"]))
    assert refused.inputs == []  # the dry forward on the first batch came before its step
    with pytest.raises(ConfigError, match="gives no output for task 'sum'"):
        Trainer(missing, problem.tasks, Seen(), progress=False).validate(
            data, sample=sample_batch(DataLoader(problem.splits["val"], batch_size=4))
        )


def test_sample_batch_leaves_the_loader_and_the_random_state():
    problem, loader = small_problem()
    torch.manual_seed(0)
    state, loader_state = torch.get_rng_state(), loader.generator.get_state()
    sample = sample_batch(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(loader.generator.get_state(), loader_state)
    first = [problem.splits["train"][i][0] for i in range(8)]  # unshuffled: the first rows
    assert torch.equal(sample[0], torch.stack(first))
    assert sample_batch(iter(loader)) is None and sample_batch(OwnShuffle([])) is None
    multi = sample_batch({"a": loader, "b": loader})
    assert set(multi) == {"a", "b"} and torch.equal(multi["a"][0], sample[0])


def test_validation_does_not_change_the_run():
    """The dry forward pass and the method trials restore every random state: training is
    bit-identical to a run without the checks."""
    problem, loader = small_problem()
    torch.manual_seed(1)
    model = small_model(problem)
    twin = copy.deepcopy(model)
    trainer = Trainer(model, problem.tasks, budget=Budget(steps=3), progress=False)
    trainer.validate(loader, sample=sample_batch(loader))
    trainer.fit(loader)
    _, fresh = small_problem()  # a loader whose generator starts where the first one did
    unchecked = Trainer(twin, problem.tasks, budget=Budget(steps=3), progress=False)
    unchecked._validated = True  # skip the checks: the reference
    unchecked._checked_batch = True
    unchecked._setup_strategy()
    unchecked.fit(fresh)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


class CountingHPS(HPS):
    """HPS that counts the calls of each head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = dict.fromkeys(self.heads, 0)
        for name, head in self.heads.items():
            head.register_forward_hook(lambda *_, name=name: self._count(name))

    def _count(self, name):
        self.calls[name] += 1


def test_alternating_steps_compute_only_their_groups_heads():
    """Each one-task group step runs the encoder and that task's head (HPS's forward(x,
    task=t)), not every head: 3 head calls per batch, not 9; the steps and the reported losses
    are those of the full forward."""
    problem, _ = small_problem()
    runs = {}
    for alone in (True, False):
        torch.manual_seed(0)
        model = CountingHPS(
            nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.ReLU()),
            {t: nn.Linear(16, k) for t, k in problem.task_outputs.items()},
        )
        trainer = Trainer(model, problem.tasks, Alternating(), budget=Budget(steps=6),
                          progress=False, track_exploration=False)  # fmt: skip
        if not alone:
            trainer._checked_batch = True  # no dry forward: task_forward stays False
        _, fresh = small_problem()
        trainer.fit(fresh)
        assert trainer.task_forward is alone
        runs[alone] = (model, trainer)
    model, _ = runs[True]
    # 2 steps each, the dry forward, and its check of forward(x, task="left")
    assert model.calls == {"left": 2 + 1 + 1, "right": 2 + 1, "sum": 2 + 1}
    assert runs[False][0].calls == {"left": 6, "right": 6, "sum": 6}  # every head, every step
    for a, b in zip(runs[True][0].state_dict().values(), runs[False][0].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_forward_that_takes_task_must_give_that_task():
    problem, loader = small_problem()

    class Ignores(HPS):
        def forward(self, x, task=None, return_features=False):
            outputs = super().forward(x)
            return {t: out * 0 for t, out in outputs.items()} if task is not None else outputs

    model = Ignores(nn.Flatten(), {t: nn.Linear(96, k) for t, k in problem.task_outputs.items()})
    trainer = Trainer(model, problem.tasks, budget=Budget(steps=1), progress=False)
    with pytest.raises(ConfigError, match=r"forward\(x, task='left'\) does not give the output"):
        trainer.fit(loader)


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    problem, loader = small_problem()
    trainer = Trainer(
        small_model(problem),
        problem.tasks,
        budget=Budget(steps=1),
        progress=False,
        out_dir=tmp_path,
        checkpoint_every=1,
    )
    trainer.fit(loader)
    other = nn.Sequential(nn.Flatten(), nn.Linear(96, 8), nn.ReLU())
    heads = {t: nn.Linear(8, k) for t, k in problem.task_outputs.items()}
    resumed = Trainer(
        HPS(other, heads), problem.tasks, budget=Budget(steps=2), progress=False, out_dir=tmp_path
    )
    with pytest.raises(MtlkitError, match="does not fit this model and strategy"):
        resumed.fit(loader, resume=True)
