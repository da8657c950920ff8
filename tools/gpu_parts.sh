#!/usr/bin/env bash
# Wheels too big for one device call (../shared/GPU.md): onnxruntime-gpu (255 MB) for
# ort-cuda and onnxruntime-ep-nv-tensorrt-rtx-cu13 (146 MB) for trt-rtx. A call carries at
# most 64 MiB with the working tree (~19 MB) and .whl (~12 MB), so each wheel travels in
# parts, one folder of parts per call, while the machine stays warm (it is given back after
# ~30 s idle: make the calls back to back).
#
#   here:  bash tools/gpu_parts.sh split onnxruntime-ep-nv-tensorrt-rtx-cu13==0.5.0
#          (NAME==VERSION is downloaded; a path to a .whl here is split as it is)
#          (prints the calls: each carries .gpu-parts/NN and runs `bash tools/gpu_parts.sh stash`)
#   there: bash tools/gpu_parts.sh stash      # copies this call's parts to $STASH
#          bash tools/gpu_parts.sh install    # joins each complete wheel, checks its sha256,
#                                             # installs it into $SITE (tools/gpu_check.sh does)
#
# Knobs: PART_SIZE (split -b, default 30M), PARTS (default .gpu-parts), STASH (default /tmp/gpu-parts),
# SITE (default /tmp/site), PYTHON (default python3).
set -euo pipefail
PART_SIZE=${PART_SIZE:-30M}
PARTS=${PARTS:-.gpu-parts}
STASH=${STASH:-/tmp/gpu-parts}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}

split_wheels() {
  [ $# -gt 0 ] || { echo "usage: gpu_parts.sh split NAME==VERSION ..." >&2; exit 2; }
  grep -qx "/$PARTS/" .git/info/exclude 2>/dev/null || echo "/$PARTS/" >> .git/info/exclude
  rm -rf "$PARTS" && mkdir -p "$PARTS/wheels"
  local names=()
  for want in "$@"; do  # a wheel file already here, or NAME==VERSION to download
    if [[ "$want" == *.whl && -f "$want" ]]; then cp "$want" "$PARTS/wheels/"; else names+=("$want"); fi
  done
  if [ ${#names[@]} -gt 0 ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$PARTS/wheels" \
      "${names[@]}"
  fi
  local n=0
  for wheel in "$PARTS"/wheels/*.whl; do
    local name sum count i=0
    name=$(basename "$wheel")
    sum=$(sha256sum "$wheel" | cut -d' ' -f1)
    split -b "$PART_SIZE" -d -a 3 "$wheel" "$PARTS/wheels/$name.part-"
    count=$(ls "$PARTS/wheels/$name".part-* | wc -l)
    for part in "$PARTS/wheels/$name".part-*; do
      n=$((n + 1)); i=$((i + 1))
      local folder
      folder=$(printf '%s/%02d' "$PARTS" "$n")
      mkdir -p "$folder"
      mv "$part" "$folder/"
      echo "$sum  $name $count" > "$folder/$name.sha256"  # every folder names its wheel
    done
    rm "$wheel"
  done
  rmdir "$PARTS/wheels"
  echo "$n parts of at most $PART_SIZE bytes; one device call each, back to back:"
  for folder in "$PARTS"/[0-9]*; do
    echo "  run: bash tools/gpu_parts.sh stash    carry: [\"$folder\"]"
  done
  echo "then the checks (they join and install what was stashed):"
  echo "  run: bash tools/gpu_check.sh    carry: [\".whl\"]"
}

stash() {
  mkdir -p "$STASH"
  local found=0
  for folder in "$PARTS"/[0-9]*; do
    [ -d "$folder" ] || continue
    cp "$folder"/* "$STASH/"
    found=1
  done
  [ "$found" = 1 ] || { echo "no parts under $PARTS: carry a .gpu-parts/NN folder" >&2; exit 2; }
  ls -l "$STASH"
}

install() {
  [ -d "$STASH" ] || { echo "nothing stashed in $STASH"; return 0; }
  local status=0
  for record in "$STASH"/*.sha256; do
    [ -e "$record" ] || continue
    local sum name count have
    read -r sum name count < "$record"
    have=$(ls "$STASH/$name".part-* 2>/dev/null | wc -l)
    if [ "$have" != "$count" ]; then
      echo "$name: $have of $count parts stashed; not installed"; status=1; continue
    fi
    cat "$STASH/$name".part-* > "$STASH/$name"
    if [ "$(sha256sum "$STASH/$name" | cut -d' ' -f1)" != "$sum" ]; then
      echo "$name: joined parts do not match its sha256; not installed"; rm "$STASH/$name"
      status=1; continue
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$STASH/$name"
    echo "$name: installed into $SITE"
  done
  return $status
}

case "${1:-}" in
  split) shift; split_wheels "$@" ;;
  stash) stash ;;
  install) install ;;
  *) echo "usage: gpu_parts.sh split NAME==VERSION ... | stash | install" >&2; exit 2 ;;
esac
