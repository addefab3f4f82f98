"""DVC stage `prepare` (see dvc.yaml): parse options, load params, call vesselseg, write outputs."""

from vesselseg.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare")
