#!/usr/bin/env bash
# zvl_ds quick start, on a CPU machine, end to end in a few minutes:
#   install -> demo data -> WebDataset shards -> 2-rank DeepSpeed training (ZeRO-2, DGA, MixUpNCE, debiased
#   sampling) -> zero-shot retrieval -> exported model.
# Everything lands in ./quickstart (or $ZVL_QUICKSTART_DIR). Running it again resumes/reuses what is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
work=${ZVL_QUICKSTART_DIR:-quickstart}
py=.venv/bin/python
# the demo runs on the CPU whatever the machine has (DS_ACCELERATOR also silences DeepSpeed's probe warning)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
start=$(date +%s)
step() { printf '\n== [%3ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "install (tools/install.sh: .venv, CPU torch pinned where there is no GPU)"
bash tools/install.sh

step "demo data: two training styles of the same concepts, a validation set, a classification set (python -m zvl_ds.make_demo_data)"
$py -m zvl_ds.make_demo_data --out "$work/data"

step "shards (python -m zvl_ds.make_shards)"
$py -m zvl_ds.make_shards --data-root "$work/data" --dataset demo_flat --dataset demo_sketch --dataset demo_val \
    --split all --out "$work/shards" --overwrite --quiet

step "train configs/demo.yaml on 2 ranks with the deepspeed launcher (ZeRO-2, DGA, MixUpNCE, debias)"
.venv/bin/deepspeed --num_gpus 2 --no_local_rank --master_port "${ZVL_MASTER_PORT:-29561}" zvl_ds/train.py \
    --deepspeed_config ds_configs/zero2.json --cfg configs/demo.yaml \
    data.data_path="$work/shards" ckpt.dir="$work/output" data.zeroshot.demo_classify.path="$work/data/demo_classify" \
    2>&1 \
    | grep --line-buffered -v -E "^\[20[0-9-]+ |Warning|warnings.warn|return func|^\s*$"

step "zero-shot retrieval of the trained model (python -m zvl_ds.eval_retrieval)"
$py -m zvl_ds.eval_retrieval --model "$work/output/demo" --cfg configs/demo.yaml data.data_path="$work/shards" \
    --out "$work/metrics.json" --no-progress

step "export a model folder that loads without DeepSpeed (python -m zvl_ds.export)"
$py -m zvl_ds.export "$work/output/demo" --out "$work/model"

step "zero-shot classification by shape (python -m zvl_ds.classify)"
$py -m zvl_ds.classify --model "$work/model" --images "$work/data/demo_classify" --out "$work/classify.json"

step "done"
cat <<MSG
Retrieval metrics (%, chance level on the 'chance' row): $work/metrics.json
Classification:  $work/classify.json  (also eval/demo_classify/top1 in training)
Checkpoints:     $work/output/demo/   (resume: run the same training command again)
Exported model:  $work/model/          (python -c "import zvl_ds; m = zvl_ds.load_model('$work/model')")
TensorBoard:     .venv/bin/tensorboard --logdir $work/output/demo/tensorboard
MSG
