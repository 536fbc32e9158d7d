"""The package's shape: no import circles (imports inside functions included), and the boundaries
docs/architecture.md promises."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "custom" / "fedesm"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    graph = {m: set() for m in mods}
    for cur, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = cur.split(".") if path.name == "__init__.py" else cur.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = {base} | {f"{base}.{a.name}" for a in node.names}
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                # importing a package's face (__init__) from inside it is not a dependency on a module
                if name and name != cur and not (mods[name].name == "__init__.py" and cur.startswith(name + ".")):
                    graph[cur].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports(_modules())
    assert sum(len(v) for v in graph.values()) > 100  # the walk sees the package's imports
    assert _cycles(graph) == []


def test_the_walk_finds_a_circle_hidden_in_a_function():
    """The check itself can fail: an import inside a function closes a circle it reports."""
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert _cycles(graph) == []
    graph["c"].add("a")
    assert _cycles(graph) == [["a", "b", "c"]]


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_nvflare_glue_imports_nvflare():
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "nvflare" in _third_party(p))
    assert importers and all(p.startswith(("flare/", "launch/")) for p in importers), importers


@pytest.mark.parametrize("module", ["aggregation.py", "settings.py", "keys.py", "architectures.py", "tables.py", "results.py",
                                    "resume.py", "site_run.py"])
def test_framework_free_cores_stay_free(module):
    """The aggregation maths, the settings and the name rules import neither NVFLARE nor PEFT at the top."""
    tree = ast.parse((PACKAGE / module).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top.add(node.module.split(".")[0])
    assert not top & {"nvflare", "peft", "esm"}, top


def test_settings_have_one_home():
    """The LoRA defaults and the training keys are written once: nowhere else in the package do the
    literal defaults of LoraSettings appear as keyword defaults."""
    offenders = []
    for p in PACKAGE.rglob("*.py"):
        if p.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args[-len(node.args.defaults):] if node.args.defaults else []
                for arg, default in zip(args, node.args.defaults):
                    if arg.arg in ("lora_r", "lora_alpha", "lora_dropout", "steps_per_round", "grad_noise_std"):
                        offenders.append(f"{p.relative_to(PACKAGE)}:{node.name}({arg.arg}=...)")
    assert offenders == [], offenders


# Flags that share a settings field's name but are not that setting, written by hand on purpose.
NOT_THE_SETTING = {
    ("make-checkpoint", "--arch"): "the architecture of the random checkpoint file it writes",
    ("make-checkpoint", "--seed"): "the seed of that checkpoint's random init",
    ("data split", "--seed"): "the seed of the split",
    ("data synth", "--seed"): "the seed of the synthetic set",
    ("data synth", "--max-len"): "the longest synthetic chain",
    ("data validate", "--max-len"): "a report's threshold: chains longer than this are counted",
    ("job export", "--resume-from"): "federation.resume_from taken as a path, never read as YAML",
    ("demo", "--backbone"): "auto | random | a source: chooses between cached pretrained weights and a random init",
}


def _subcommands(parser, path=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, path + (name,))
    yield " ".join(path), parser


def test_cli_flags_have_one_home_too():
    """Every flag that names a setting is made from its field (`add_arguments`): its parser default is None,
    which `from_arguments` reads as the settings' own default, and the default its --help shows is the
    field's (the demo's: its DEMO settings'), so argparse and the settings blocks cannot drift apart."""
    from fedesm.cli import build_parser
    from fedesm.experiments.demo import DEMO
    from fedesm.settings import JobSettings

    prefix = {"lora": "lora-"}
    setting_flags = {f"--{prefix.get(block, '')}{name.replace('_', '-')}"
                     for block, cls in JobSettings.BLOCKS.items() for name in cls.names()}
    by_hand, generated = [], set()
    for command, parser in _subcommands(build_parser()):
        for action in parser._actions:
            if getattr(action, "setting", None) is None:
                by_hand += [f"{command} {flag}" for flag in action.option_strings
                            if flag in setting_flags and (command, flag) not in NOT_THE_SETTING]
                continue
            cls, name = action.setting
            base = getattr(DEMO, cls.BLOCK) if command == "demo" else cls()
            default = getattr(base, name)
            shown = ",".join(default) if isinstance(default, tuple) else default
            assert action.default is None or action.default == getattr(cls(), name), (command, action.dest)
            assert default is None or "(default: " in action.help or action.help.endswith(f"(default {shown})"), (
                command, action.dest, action.help)
            generated.add((command, action.option_strings[0]))
    assert by_hand == [], by_hand
    for command, flag in [("train", "--backbone"), ("train", "--arch"), ("train", "--head-dropout"),
                          ("predict", "--threshold"), ("predict", "--max-len"), ("predict", "--device"),
                          ("predict", "--backbone"), ("params", "--arch"), ("params", "--num-labels"),
                          ("export", "--backbone"), ("demo", "--arch")]:
        assert (command, flag) in generated


def _package(module: str) -> str:
    """`fedesm.flare.aggregator` -> `fedesm.flare`; a top-level module (`fedesm.settings`) is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {_package(m): set() for m in graph}
    for mod, deps in graph.items():
        packages[_package(mod)] |= {_package(d) for d in deps if _package(d) != _package(mod)}
    return packages


def test_no_package_imports_one_that_imports_it_back():
    """The file-level check cannot see training/ -> evaluation/ -> training/ through different files;
    this one folds each package (flare, launch, training, ...) into one node."""
    packages = _package_graph(_imports(_modules()))
    assert {"fedesm.flare", "fedesm.launch", "fedesm.training", "fedesm.evaluation"} <= set(packages)
    assert _cycles(packages) == []  # settings reads the shapes table and key names above model/, not in it


def test_the_package_walk_sees_a_loop_through_different_files():
    """The check itself can fail: two files that import nothing of each other still close a package loop."""
    graph = {"fedesm.training.centralized": {"fedesm.evaluation.scoring"},
             "fedesm.evaluation.scoring": {"fedesm.training.inference"}, "fedesm.training.inference": set()}
    assert _cycles(graph) == []
    assert _cycles(_package_graph(graph)) == [["fedesm.evaluation", "fedesm.training"]]


# the trainer's insides: what a resume moves goes through LocalTrainer.seek / train_round, never a write from outside
TRAINER_INSIDES = {"trainer", "scheduler", "accountant", "gradients", "optimizer"}


def _writes_into_trainer(source: str) -> list[str]:
    """Assignments (=, +=, del) whose target lies inside a trainer (`x.trainer.global_step = ...`,
    `trainer.scheduler.last_epoch = ...`), and any use of a trainer's scheduler, accountant or optimizer."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for target in targets:
            chain, cur = [], target.value if isinstance(target, ast.Attribute) else None
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                chain.append(cur.id)
            if set(chain) & TRAINER_INSIDES:
                found.append(ast.unparse(target))
        if isinstance(node, ast.Attribute) and node.attr in {"scheduler", "accountant", "optimizer"}:
            found.append(ast.unparse(node))
    return found


def test_no_module_outside_training_writes_into_the_trainer():
    offenders = {str(p.relative_to(PACKAGE)): w for p in PACKAGE.rglob("*.py")
                 if p.relative_to(PACKAGE).parts[0] != "training" and (w := _writes_into_trainer(p.read_text()))}
    assert offenders == {}


def test_the_trainer_write_check_sees_the_old_resume_code():
    """The check itself can fail: the executor's resume alignment before issue 22 is three offences."""
    old = ("self.trainer.scheduler.last_epoch = steps - 1\nself.trainer.global_step = steps\n"
           "trainer.gradients.accountant.steps += 1\nself.trainer = LocalTrainer()\n")
    assert _writes_into_trainer(old) == ["self.trainer.scheduler.last_epoch", "self.trainer.global_step",
                                         "trainer.gradients.accountant.steps", "self.trainer.scheduler",
                                         "trainer.gradients.accountant"]
