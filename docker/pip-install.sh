#!/bin/sh
# `pip install` for the Dockerfiles' build steps. A step run with `--mount=type=secret,id=pip_ca` sees
# the CA bundle given to the build (`--secret id=pip_ca,src=...`; needed where a proxy re-signs TLS)
# only while it runs, so it is trusted here and never stored in a layer.
set -e
if [ -f /run/secrets/pip_ca ]; then
    export PIP_CERT=/run/secrets/pip_ca
fi
exec pip install "$@"
