#!/bin/sh
# One stage of `make train-v3`: run COMMAND unless the stage's exported model is already there.
#   sh scripts/v3_stage.sh NAME COMMAND...      (NAME: the run folder under runs/v3/, e.g. t2i_micro, distill/kdmd)
# A stage whose output was committed under models/v3-stages/NAME (fp16 pipeline folder, ~18 MB) is restored into
# runs/v3/NAME/final and not retrained, so the 7.5-hour chain continues on a machine whose runs/ did not survive.
set -eu
name=$1; shift
final="runs/v3/$name/final"
kept="models/v3-stages/$name"
if [ ! -f "$final/pipeline.json" ] && [ -f "$kept/pipeline.json" ]; then
    mkdir -p "runs/v3/$name"
    cp -r "$kept" "$final.tmp" && mv "$final.tmp" "$final"
    echo "v3 $name: restored $final from $kept"
fi
if [ -f "$final/pipeline.json" ]; then
    echo "v3 $name: $final exists, not retrained (delete it to retrain)"
    exit 0
fi
exec "$@"
