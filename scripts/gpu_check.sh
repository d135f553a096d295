#!/usr/bin/env bash
# GPU checks for saelab on one CUDA machine: the SAE trainer for every architecture (ground-truth recovery on a
# synthetic dictionary), SAE-step throughput, the language-model path with and without bf16 autocast (training
# from the store, several hooks from one pass, LM evals), torchrun's NCCL start-up, the dashboard, and `lm train`.
# ("default" is the step saelab takes: on CUDA the plain path, as the CPU-fused paths measured slower there.)
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # ~3 minutes on one H100; prints one line per check
#
# Every check runs even when an earlier one fails; the script exits non-zero if any failed.
set -uo pipefail
out=${1:-/tmp/saelab_gpu_check}  # logs and runs; the summary goes to stdout
mkdir -p "$out"
py=${PYTHON:-python3}
failed=0
check() {  # check NAME COMMAND...: run, time, and report one line
    local name=$1 start end
    shift
    start=$(date +%s%N)
    if "$@" >"$out/$name.log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
    end=$(date +%s%N)
    printf '%-28s %-6s %8d ms\n' "$name" "$status" $(((end - start) / 1000000))
    [ "$status" = ok ] || tail -n 15 "$out/$name.log"
}
saelab() { "$py" -m saelab "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

synthetic=synthetic:n_features=256,d_in=64,mean_l0=1
for arch in topk batchtopk relu jumprelu gated; do
    sparsity=(--k 4)
    [[ $arch == relu || $arch == gated || $arch == jumprelu ]] && sparsity=()
    check "synthetic_$arch" saelab sae train --source "$synthetic" --architecture "$arch" "${sparsity[@]}" \
        --d-sae 512 --steps 800 --batch-size 4096 --lr 3e-3 --dead-after-tokens 1000000 --device cuda \
        --checkpoint-every 0 --quiet --out "$out/synthetic_$arch"
    saelab sae eval "$out/synthetic_$arch" --device cuda --json >"$out/synthetic_$arch.json" 2>>"$out/synthetic_$arch.log"
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); g=r['ground_truth']; print(f\"    MCC {g['mcc']:.3f}  recovered {g['recovered']}/256  EV {r['explained_variance']:.3f}  L0 {r['l0']:.2f}\")" "$out/synthetic_$arch.json"
done

check sae_step_throughput "$py" - <<'PY'
import time, torch
from saelab.sae.model import SAEConfig, build_sae
from saelab.sae.train import train_step
torch.manual_seed(0)
x = torch.randn(4096, 256, device="cuda")
for arch, fast in (("relu", True), ("relu", False), ("topk", True), ("topk", False)):
    sae = build_sae(SAEConfig(arch, 256, 4096, k=32)).cuda()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-5)
    for _ in range(5):
        train_step(sae, opt, x, fast=fast)
    torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(50):
        train_step(sae, opt, x, fast=fast)
    torch.cuda.synchronize(); seconds = (time.perf_counter() - start) / 50
    print(f"{arch:5s} {'default' if fast else 'reference':9s} {seconds * 1e3:7.2f} ms/step  {4096 / seconds / 1e6:6.2f} M tokens/s")
PY
cat "$out/sae_step_throughput.log"

hook=blocks.0.hook_resid_post
for precision in fp32 bf16; do
    flag=(); [ $precision = bf16 ] && flag=(--bf16)
    check "lm_sae_$precision" saelab sae train --hook $hook --k 32 --d-sae 2048 --steps 600 --batch-size 4096 \
        --device cuda "${flag[@]}" --checkpoint-every 0 --quiet --out "$out/lm_sae_$precision"
    saelab sae eval "$out/lm_sae_$precision" --device cuda --json >"$out/lm_sae_$precision.json" 2>>"$out/lm_sae_$precision.log"
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); print('    ' + '  '.join(f'{k} {r[k]:.4g}' for k in ('ce_loss_recovered','kl_div_score','explained_variance','l0') if k in r))" "$out/lm_sae_$precision.json"
done
check lm_two_hooks saelab sae train --hook $hook --hook blocks.1.hook_resid_post --k 32 --d-sae 2048 --steps 200 \
    --batch-size 4096 --device cuda --checkpoint-every 0 --quiet --out "$out/lm_two_hooks"
check torchrun_nccl_1gpu "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m saelab sae train \
    --hook $hook --k 32 --d-sae 2048 --steps 100 --batch-size 4096 --device cuda --checkpoint-every 50 --quiet \
    --out "$out/lm_torchrun"
check dashboard_64_latents saelab dashboard "$out/lm_sae_fp32" --features 64 --out "$out/site" --device cuda
check lm_train_2M_tokens saelab lm train --tokens 2000000 --device cuda --out "$out/lm"
grep -h "held-out" "$out/lm_train_2M_tokens.log" | sed 's/^/    /'
exit $failed
