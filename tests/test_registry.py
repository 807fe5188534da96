import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from harness.api.components import ComponentConfig, Defence
from harness.api.config import resolve
from harness.api.errors import UnknownComponentError
from harness.api.registry import ATTACKS, DATASETS, DEFENCES, METRICS, REGISTRIES, Registry, describe, load_builtins

ROOT = Path(__file__).resolve().parent.parent


def test_builtins_registered():
    assert "none" in DEFENCES.names()
    assert {"harmfulqa", "toxicity"} <= set(ATTACKS.names())
    assert "keyword_refusal" in METRICS.names()


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownComponentError) as exc:
        ATTACKS.get("harmfulq")
    msg = str(exc.value)
    assert "unknown attack 'harmfulq'" in msg
    assert "Did you mean 'harmfulqa'" in msg
    assert "toxicity" in msg  # the list of known names


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(UnknownComponentError) as exc:
        ATTACKS.get("zzzzzz")
    assert "Did you mean" not in str(exc.value)
    assert "harmfulqa" in str(exc.value)


def test_decorator_and_duplicate():
    reg = Registry("widget", "harness.test-widgets")

    @reg.register("a")
    class A(Defence):
        """An A."""

    assert reg.get("a") is A and A.registry_name == "a"
    reg.add("a", A)  # same object again: fine
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", type("B", (Defence,), {}))


# ---- plug-ins installed from packages built here ------------------------------------------------
def _package(root: Path, dist: str, module: str, source: str, entry_points: dict[str, dict[str, str]]) -> Path:
    """A minimal installable distribution ``dist`` with one module and the given entry points."""
    folder = root / dist
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text(textwrap.dedent(source))
    eps = "".join(f'[project.entry-points."{group}"]\n' + "".join(f'{n} = "{t}"\n' for n, t in items.items())
                  for group, items in entry_points.items())
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{dist}"\nversion = "0.1.0"\n\n{eps}\n'
        f'[tool.setuptools]\npackages = ["{module}"]\n')
    return folder


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """pip-installs into one target folder: the example plug-in (examples/plugin_defence), a
    plug-in whose module fails to import, one that declares a built-in's name as its entry point,
    and one whose module registers a built-in's name with the decorator."""
    root = tmp_path_factory.mktemp("plugins")
    example = root / "plugin_defence"  # build from a copy: the source tree stays clean
    shutil.copytree(ROOT / "examples" / "plugin_defence", example)
    broken = _package(root, "harness-broken-plugin", "harness_broken_plugin", """
        import a_module_that_is_not_installed  # noqa: F401
        """, {"harness.defences": {"broken_defence": "harness_broken_plugin:Broken"}})
    clash = _package(root, "harness-clash-plugin", "harness_clash_plugin", """
        from harness.api import ComponentConfig, Defence

        class FakeRepNoise(Defence):
            \"\"\"Not RepNoise.\"\"\"

            class Config(ComponentConfig):
                pass
        """, {"harness.defences": {"repnoise": "harness_clash_plugin:FakeRepNoise"}})
    sneaky = _package(root, "harness-sneaky-plugin", "harness_sneaky_plugin", """
        from harness.api import ATTACKS, Attack, ComponentConfig

        @ATTACKS.register("harmfulqa")
        class Sneaky(Attack):
            \"\"\"Registers a built-in's name from its module.\"\"\"

            class Config(ComponentConfig):
                pass
        """, {"harness.attacks": {"sneaky": "harness_sneaky_plugin:Sneaky"}})
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(example), str(broken), str(clash), str(sneaky)], check=True)
    return {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def harness_cli(env, *args):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], env=env, capture_output=True, text=True)


def test_component_added_by_installed_package_via_entry_point(plugin_site):
    """The example plug-in appears in `harness list` and runs a dry run without any change to
    this repository."""
    out = harness_cli(plugin_site, "list")
    assert out.returncode == 0, out.stderr
    assert "weight_noise" in out.stdout and "Example plug-in defence" in out.stdout
    assert "[plug-in: harness-plugin-example]" in out.stdout
    dry = harness_cli(plugin_site, "run", "--defence", "weight_noise", "--attack", "harmfulqa", "--set",
                      "defence.sigma=0.5", "--set", "eval.toxicity_scorer.name=keyword_refusal", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert '"sigma": 0.5' in dry.stdout
    bad = harness_cli(plugin_site, "run", "--defence", "weight_noise", "--attack", "harmfulqa", "--set",
                      "defence.sigma=-1", "--dry-run")
    assert bad.returncode == 2 and "defence.sigma" in bad.stderr


def test_broken_and_clashing_plugins_are_reported_and_skipped(plugin_site):
    out = harness_cli(plugin_site, "list")
    assert out.returncode == 0, out.stderr
    listing, _, skipped = out.stdout.partition("skipped plug-ins:")
    # the built-ins are there, described by themselves, never replaced
    for registry in (DEFENCES, ATTACKS, METRICS, DATASETS):
        for name in registry.builtins():
            assert f"  {name} " in listing
    repnoise_line = next(line for line in listing.splitlines() if line.strip().startswith("repnoise "))
    assert "Representation Noising" in repnoise_line and "plug-in" not in repnoise_line
    assert "Not RepNoise" not in listing and "broken_defence" not in listing and "sneaky" not in listing
    # each problem is reported with its distribution, in the listing and as a WARNING
    for dist, name, why in [("harness-broken-plugin", "broken_defence", "import failed: ModuleNotFoundError"),
                            ("harness-clash-plugin", "repnoise", "clashes with the built-in"),
                            ("harness-sneaky-plugin", "sneaky", "is a built-in")]:
        line = next((x for x in skipped.splitlines() if f"'{name}' from distribution '{dist}'" in x), None)
        assert line is not None and why in line, skipped
        assert "WARNING" in out.stderr and dist in out.stderr
    # asking for them: the built-in is used; the broken one fails in one line naming its distribution
    dry = harness_cli(plugin_site, "run", "--defence", "repnoise", "--attack", "harmfulqa", "--dry-run",
                      "--set", "eval.toxicity_scorer.name=keyword_refusal")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["config"]["defence"]["beta"] == DEFENCES.get("repnoise").Config().beta
    broken = harness_cli(plugin_site, "run", "--defence", "broken_defence", "--attack", "harmfulqa", "--dry-run")
    assert broken.returncode == 2
    error = [x for x in broken.stderr.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "harness-broken-plugin" in error[0] and "Traceback" not in broken.stderr


def test_builtin_names_are_known_without_importing_them():
    """The registry reads the built-ins' decorators from their source; importing them all
    registers exactly the names and classes it found."""
    code = ("import sys, json; from harness.api.registry import REGISTRIES;"
            "names = {k: r.names() for k, r in REGISTRIES.items()};"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('defences', 'attacks', 'metrics')"
            " or m.startswith('harness.lib.datasets.'));"
            "print(json.dumps({'names': names, 'loaded': loaded, 'torch': 'torch' in sys.modules}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=ROOT).stdout)
    assert out["loaded"] in ([], ["attacks", "defences", "metrics"][:0]) and not out["torch"]
    load_builtins()
    for kind, registry in REGISTRIES.items():
        assert out["names"][kind] == sorted(registry.builtins())
        for name, entry in registry.builtins().items():
            cls = registry.get(name)
            assert f"{cls.__module__}:{cls.__qualname__}" == entry.target and cls.registry_name == name
            assert entry.description == describe(cls)


@pytest.mark.parametrize("argv", [["list"], ["--help"], ["run", "--help"],
                                  ["run", "--defence", "repnose", "--attack", "harmfulqa", "--dry-run"],
                                  ["run", "--set", "eval.samples=0", "--dry-run"],
                                  ["run", "--set", "attack.lr", "--dry-run"]],
                         ids=["list", "help", "run-help", "unknown-defence", "bad-eval-set", "set-without-value"])
def test_fast_paths_import_neither_torch_nor_transformers(argv):
    code = ("import sys; from harness.cli import main\n"
            f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "print('HEAVY', heavy, 'RC', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY [] RC"), (last, out.stderr[-2000:])
    expected = 0 if argv[0] == "list" or "--help" in argv else 2
    assert last.endswith(f"RC {expected}"), (last, out.stderr[-2000:])


def test_deprecated_flat_modules_still_work():
    for module in ("harness.components", "harness.registry"):
        sys.modules.pop(module, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = __import__(module, fromlist=["*"])
        assert any(issubclass(w.category, DeprecationWarning) and "harness.api" in str(w.message) for w in caught)
    from harness import components, registry

    assert components.Defence is Defence and registry.DEFENCES is DEFENCES


# ---- traits -----------------------------------------------------------------------------------
def test_traits_are_class_attributes():
    d = {name: DEFENCES.get(name) for name in DEFENCES.builtins()}
    assert not d["none"].changes_model and all(c.changes_model for n, c in d.items() if n != "none")
    assert d["security_vectors"].adapter_only and not d["repnoise"].adapter_only
    assert d["none"].cost_factor == d["random_init"].cost_factor == 0.0
    assert METRICS.get("perspective").remote and not METRICS.get("detoxify").remote
    assert ATTACKS.get("toxicity").evaluation == "toxicity" and ATTACKS.get("harmfulqa").evaluation == "harmfulness"
    assert DATASETS.get("smoke").provides == () and "response" in DATASETS.get("beavertails").provides
    lora = ATTACKS.get("harmfulqa").Config(lora={"r": 4})
    assert ATTACKS.get("harmfulqa").trains_adapter_only(lora)


def test_cost_model_reads_the_defence_traits():
    """The sweep's cost estimate scales with each defence's own relative cost (it used to key on
    "adversarial" and "repnoise_corrected", names no defence has: adversarial_loss was costed as
    plain fine-tuning and corrected RepNoise as the reference variant)."""
    from harness.sweep import cost

    def train_s(defence, *sets):  # training seconds per token (the defences' token counts differ)
        spec = resolve("paper", defence=defence, attack="harmfulqa", sets=list(sets))
        detail = cost.estimate("defence", spec, "h100", workers=1).detail
        return detail.get("train_s", 0.0) / max(detail.get("defence_tokens", 1.0), 1.0)

    plain = train_s("safety_training")
    assert train_s("adversarial_loss") == pytest.approx(2.0 * plain)
    assert train_s("repnoise") == pytest.approx(3.0 * plain)
    assert train_s("repnoise", "defence.variant=corrected") == pytest.approx(2.5 * plain)
    assert train_s("gradient_ascent", "defence.retain_weight=1") == pytest.approx(2.0 * train_s("gradient_ascent"))
    assert train_s("none") == 0.0
    # an adapter-only defence keeps no optimizer state for the frozen weights
    sv = cost.estimate("defence", resolve("paper", defence="security_vectors", attack="harmfulqa"), "h100", workers=1)
    st = cost.estimate("defence", resolve("paper", defence="safety_training", attack="harmfulqa"), "h100", workers=1)
    assert sv.memory_gb < st.memory_gb / 2
