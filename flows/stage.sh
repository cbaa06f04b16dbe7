#!/bin/sh
# Runs one dvc.yaml stage with the project's interpreter, however `dvc` was started
# (`.venv/bin/dvc repro` without an activated venv included): $TRACEBANK_PYTHON when set,
# else the project's .venv, else python3 on PATH.
if [ -n "$TRACEBANK_PYTHON" ]; then
    py=$TRACEBANK_PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" -m flows.dvc_stage "$@"
