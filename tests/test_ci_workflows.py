"""The GitHub Actions workflows cannot run here; what can be checked is their structure: they parse,
the test job runs the README's test command, and publishing happens only after the tests pass, on
main, when the version changes."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"


def load(name: str) -> dict:
    document = yaml.safe_load((WORKFLOWS / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as true
    return document


def steps_of(job: dict) -> list[dict]:
    steps = job.get("steps", [])
    assert all(isinstance(step, dict) and ("uses" in step or "run" in step) for step in steps), steps
    return steps


def test_every_workflow_parses_and_every_job_names_its_runner_or_workflow():
    for path in WORKFLOWS.glob("*.yml"):
        document = load(path.name)
        assert document["on"] and document["jobs"], path.name
        for name, job in document["jobs"].items():
            assert "runs-on" in job or "uses" in job, f"{path.name}: job {name}"
            for need in [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", []):
                assert need in document["jobs"], f"{path.name}: job {name} needs unknown job {need}"
            steps_of(job)


def test_the_test_job_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make test" in (REPO / ".ci" / "run").read_text()
    (job,) = load("test.yml")["jobs"].values()
    assert any(step.get("run", "").startswith("make test") for step in steps_of(job))
    assert {"push", "pull_request", "workflow_call"} <= set(load("test.yml")["on"])


def test_publishing_waits_for_the_tests_and_a_new_version():
    document = load("publish.yml")
    assert document["on"]["push"]["branches"] == ["main"] and document["on"]["push"]["paths"] == ["pyproject.toml"]
    jobs = document["jobs"]
    assert jobs["test"]["uses"] == "./.github/workflows/test.yml"
    publish = jobs["publish"]
    assert set(publish["needs"]) == {"version", "test"} and "changed == 'true'" in publish["if"]
    (action,) = [step for step in steps_of(publish) if step.get("uses", "").startswith("Comfy-Org/publish-node-action@")]
    assert action["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
