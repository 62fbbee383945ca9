#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu machine, CPU only, ~3 minutes on 2 cores plus the installs:
# install, get the Spanish Reina-Valera 1909 Bible, prepare it, train `bible-tiny`, sample from it.
# Re-running it resumes the run (or says it is done) and re-samples.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/sword/modules/texts/ztext/spaRV1909eb ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq sword-text-sparv   # the Bible, public domain
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e .

python -m dist_gpt.prepare --config bible-tiny
python launch/train.py --config bible-tiny "$@"   # one process: no launcher needed; Ctrl-C saves and exits 130, which stops here
out_dir=out run_name=bible-tiny   # where the run lives, as train.out_dir= / train.run_name= passed above say
for arg in "$@"; do
  case "$arg" in
    train.out_dir=*) out_dir="${arg#*=}" ;;
    train.run_name=*) run_name="${arg#*=}" ;;
  esac
done
python -m dist_gpt.sample --ckpt "$out_dir/$run_name" --prompt "En el principio" --max-new-tokens 100
