#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or explain how to get one and fail.
set -u
for cand in "${PYTHON:-}" python3.12 python3.13 python3.14 python3 python; do
  [ -z "$cand" ] && continue
  path=$(command -v "$cand" 2>/dev/null) || continue
  if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    echo "$path"; exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -rV); do
    p="$(pyenv root)/versions/$v/bin/python"
    [ -x "$p" ] && { echo "$p"; exit 0; }
  done
fi
echo "memx needs Python 3.12 or newer, and none was found on PATH (tried python3.12, python3.13, python3)." >&2
echo "Install one (e.g. 'pyenv install 3.12' or your OS package python3.12) or set PYTHON=/path/to/python3.12." >&2
exit 1
