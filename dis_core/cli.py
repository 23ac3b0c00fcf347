"""`python -m dis_core.cli ...` (what `deepspeed --module` and `torchrun -m` launch) and the
`dis` / `dis-run` console scripts: the command line lives in `dis_core.tools.cli`."""

from dis_core.tools.cli import main, run_main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
