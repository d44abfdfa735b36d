"""The documentation stays a reference: bounded pages, every result file cited, every cited file present; the
packaging's extras and the one-line error that names a missing one."""
from __future__ import annotations

import os
import re
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = os.path.join(ROOT, "docs")

# page -> the most lines it may have
LIMITS = {"README.md": 180, "benchmarks/RESULTS.md": 150}
DOC_PAGE_LIMIT = 300


def doc_pages() -> list[str]:
    """The pages a reader is sent to: the README, the results index and every page under docs/ (repo-relative)."""
    pages = ["README.md", "benchmarks/RESULTS.md"]
    pages += sorted(os.path.join("docs", f) for f in os.listdir(DOCS) if f.endswith(".md"))
    return pages


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
        return fh.read()


def result_files() -> list[str]:
    """Every file under benchmarks/results/, as a path relative to that folder."""
    out = []
    for dirpath, dirnames, filenames in os.walk(RESULTS):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, f), RESULTS).replace(os.sep, "/"))
    return sorted(out)


def expand_braces(path: str) -> list[str]:
    """``a/b.{json,md}`` -> ``["a/b.json", "a/b.md"]`` (one brace group, as the pages write them)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [path[:m.start()] + alt + path[m.end():] for alt in m.group(1).split(",")]


def test_page_lengths():
    too_long = []
    for rel in doc_pages():
        limit = LIMITS.get(rel, DOC_PAGE_LIMIT)
        n = len(read(rel).splitlines())
        if n > limit:
            too_long.append(f"{rel}: {n} lines > {limit}")
    assert not too_long, "pages over their line limit:\n" + "\n".join(too_long)


def test_every_result_file_is_cited_by_a_page():
    text = "\n".join(read(p) for p in doc_pages())
    # `name_seed{0,1,2}.json` cites name_seed0.json, name_seed1.json and name_seed2.json
    text += "\n".join(x for m in re.finditer(r"[\w./-]*\{[^{}\s]*\}[\w./-]*", text) for x in expand_braces(m.group(0)))
    uncited = [f for f in result_files() if f not in text]
    assert not uncited, ("files under benchmarks/results/ that no page (README, benchmarks/RESULTS.md, docs/*.md) "
                         "cites; cite them with the command that made them, or remove them:\n" + "\n".join(uncited))


def test_no_tensor_dumps_in_results():
    dumps = [f for f in result_files() if f.endswith((".pt", ".pth", ".bin", ".safetensors", ".npy"))]
    assert not dumps, "tensor dumps do not belong in benchmarks/results/ (give the command that makes them):\n" + \
        "\n".join(dumps)


def test_every_cited_result_file_and_linked_page_exists():
    missing = []
    for rel in doc_pages():
        text = read(rel)
        for m in re.finditer(r"benchmarks/results/[\w./{},-]*", text):
            if text[m.end():m.end() + 1] == "$":
                continue  # a path a shell command builds from a variable (`..._seed$S.json`)
            for path in expand_braces(m.group(0).rstrip(".,")):
                if not os.path.exists(os.path.join(ROOT, path)):
                    missing.append(f"{rel}: {path}")
        for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # Markdown links and images to local files
            target = m.group(1)
            if re.match(r"[a-z]+://", target):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), target))
            if not os.path.exists(path):
                missing.append(f"{rel}: link {target}")
    assert not missing, "cited files that do not exist:\n" + "\n".join(missing)


def test_readme_has_no_dates():
    dated = [line for line in read("README.md").splitlines() if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, "the README holds no dates (figures and their dates live on the docs pages):\n" + \
        "\n".join(dated)


def test_pyproject_core_and_extras():
    tomllib = pytest.importorskip("tomllib")
    from scalerec.extras import EXTRAS

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    assert isinstance(project["license"], str), "license is an SPDX string (setuptools deprecates the table form)"

    def name(req: str) -> str:
        return re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0].lower()

    assert sorted(name(r) for r in project["dependencies"]) == ["numpy", "omegaconf", "pyarrow", "torch", "tqdm"]
    extras = project["optional-dependencies"]
    for extra, dists in EXTRAS.items():
        assert extra in extras, f"extra [{extra}] named by scalerec.extras is not in pyproject.toml"
        assert {name(d) for d in dists} <= {name(r) for r in extras[extra]}, extra
    assert len(extras["all"]) == 1 and extras["all"][0].startswith("scalerec[")
    assert set(extras["all"][0][len("scalerec["):-1].split(",")) == set(EXTRAS)
    assert "scalerec[all]" in extras["dev"] and any(name(r) == "pytest" for r in extras["dev"])


def test_require_names_the_missing_extra_in_one_line():
    from scalerec.extras import MissingExtra, require

    assert require("faiss", "json") is sys.modules["json"]
    with pytest.raises(MissingExtra) as err:
        require("faiss", "scalerec_no_such_module_for_the_test", command="recommend")
    assert str(err.value) == "scalerec recommend needs the [faiss] extra: pip install 'scalerec[faiss]'"
    assert isinstance(err.value, ImportError)
    with pytest.raises(ValueError, match="unknown extra 'gpus'"):
        require("gpus", "json")


def test_require_lets_a_broken_installed_package_fail_as_it_is(tmp_path, monkeypatch):
    from scalerec.extras import MissingExtra, require

    (tmp_path / "scalerec_broken_pkg_for_the_test.py").write_text("import scalerec_its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("llm", "scalerec_broken_pkg_for_the_test")
    assert not isinstance(err.value, MissingExtra) and err.value.name == "scalerec_its_missing_dependency"


def test_finetune_and_recommend_name_their_extra(monkeypatch, tmp_path):
    from scalerec.extras import MissingExtra
    from scalerec.peft import commands as peft_commands
    from scalerec.retrieval.commands import recommend

    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it now fails as if not installed
    args = types.SimpleNamespace(method="lora", model="minilm", task="sst2", overrides=[], metrics=None, save=None,
                                 no_progress=True, json=True)
    with pytest.raises(MissingExtra, match=r"^scalerec finetune needs the \[peft\] extra: pip install 'scalerec\[peft\]'$"):
        peft_commands.run(args)

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingExtra, match=r"^scalerec recommend needs the \[faiss\] extra"):
        recommend(str(tmp_path / "best.pt"), str(tmp_path / "users.txt"), str(tmp_path / "rec.jsonl"),
                  index="IVF16,Flat")
