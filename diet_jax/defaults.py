"""Defaults shared by every config file: model, teacher, training, distillation, evaluation.

A config file (configs/<dataset>.py) calls `base_config(tiny)` and then sets its `data` section
and whatever differs for its dataset. `tiny=True` shrinks everything for tests (seconds on CPU).
"""

import ml_collections

from diet_jax.evaluate import pool
from diet_jax.results import CANDIDATE_METHODS

# The methods a run evaluates by default: the paper's seven. Warm Full Data (Full Data from the
# teacher's table, docs/evaluation.md "What the shared table costs the ranking") is a reference
# as costly as Full Data, run on demand (`--config.evaluate.methods`).
DEFAULT_METHODS = tuple(m for m in CANDIDATE_METHODS if m != "warm_full_data")


def base_config(tiny: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = not tiny  # progress bars on long loops
    # Size of the distilled / selected memory per stage: n_t = ratio * |D_t|.
    c.ratio = 0.05 if tiny else 0.015

    # ------------------------------------------------------------------ model
    c.model = ml_collections.ConfigDict()
    c.model.name = "dcn"  # build_model's default backbone; the pipeline uses evaluate.models
    c.model.embed_dim = 8 if tiny else 32
    c.model.mmoe = ml_collections.ConfigDict()
    c.model.mmoe.num_experts = 2 if tiny else 4
    c.model.mmoe.expert_hidden = (16,) if tiny else (128,)
    c.model.mmoe.gate_hidden = ()
    c.model.mmoe.tower_hidden = (8,) if tiny else (64,)
    c.model.dcn = ml_collections.ConfigDict()
    c.model.dcn.num_cross_layers = 2 if tiny else 3
    c.model.dcn.hidden = (32, 16) if tiny else (1024, 512, 256)
    c.model.dcn.use_bn = False
    # Model zoo (docs/models.md): every backbone at its reference size, FuxiCTR's model_zoo
    # defaults (WuKong: FuxiCTR's, from the WuKong paper), with the paper's embedding dim 32.
    c.model.dcnv2 = ml_collections.ConfigDict()
    c.model.dcnv2.structure = "parallel"  # parallel | stacked | stacked_parallel | crossnet_only
    c.model.dcnv2.num_cross_layers = 2 if tiny else 3
    c.model.dcnv2.low_rank_mixture = False  # True: CrossNetMix instead of full-rank CrossNetV2
    c.model.dcnv2.low_rank = 4 if tiny else 32
    c.model.dcnv2.num_experts = 2 if tiny else 4
    c.model.dcnv2.stacked_hidden = (32, 16) if tiny else (500, 500, 500)
    c.model.dcnv2.parallel_hidden = (32, 16) if tiny else (500, 500, 500)
    c.model.dcnv2.use_bn = False
    c.model.finalnet = ml_collections.ConfigDict()
    c.model.finalnet.block_type = "2B"  # 1B | 2B (two blocks, self-distillation)
    c.model.finalnet.use_bn = True
    c.model.finalnet.feature_gating = True
    c.model.finalnet.block1_hidden = (16, 16) if tiny else (64, 64, 64)
    c.model.finalnet.block2_hidden = (16, 16) if tiny else (64, 64, 64)
    c.model.finalnet.act = "none"  # reference default; FuxiCTR's tuned configs use relu
    c.model.finalnet.residual_type = "concat"  # concat | sum
    c.model.finalmlp = ml_collections.ConfigDict()
    c.model.finalmlp.mlp1_hidden = (32, 16) if tiny else (1024, 512)
    c.model.finalmlp.mlp2_hidden = (32, 16) if tiny else (1024, 512, 256)
    c.model.finalmlp.use_bn = False
    c.model.finalmlp.use_fs = True
    c.model.finalmlp.fs_hidden = (16,) if tiny else (1024, 512)
    c.model.finalmlp.fs1_context = ()  # field indices; () = a learned context vector
    c.model.finalmlp.fs2_context = ()
    c.model.finalmlp.num_heads = 2
    c.model.finalmlp.fusion_dim = 8 if tiny else 16  # fusion outputs = the head's input
    c.model.wukong = ml_collections.ConfigDict()
    c.model.wukong.num_layers = 2 if tiny else 3
    c.model.wukong.lcb_features = 4 if tiny else 40
    c.model.wukong.fmb_features = 4 if tiny else 40
    c.model.wukong.rank_k = 4 if tiny else 8  # 0: vanilla FM X X^T
    c.model.wukong.fmb_hidden = (16,) if tiny else (512, 256)
    c.model.wukong.top_hidden = (16,) if tiny else (512, 256)
    c.model.wukong.top_bn = True
    c.model.wukong.layer_norm = True

    # ------------------------------------------------------------------ teacher
    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = "dcn"  # the reference model's backbone
    c.teacher.checkpoint_dir = (
        ""  # "" means <workdir>/teacher; set to share one teacher across runs
    )

    # ------------------------------------------------------------------ train
    c.train = ml_collections.ConfigDict()
    c.train.optimizer = "adam"
    # Adam rate of the teacher, Full Data, Cold / Warmup Start and every fine-tune. Chosen on the
    # validation day (docs/evaluation.md, "Learning rates and the fine-tune"): the teacher's
    # validation AUC is 0.6658 / 0.6721 / 0.6809 / 0.6481 at 1e-3 / 3e-3 / 1e-2 / 2e-2
    # (experiments/study_teacher_lr.py), and Full Data's grid search chose 1e-2 for most of the
    # pool. (1e-3 under-trained them: one epoch is ~30 steps a stage.)
    c.train.learning_rate = 3e-3 if tiny else 1e-2
    c.train.max_grad_norm = 10.0
    c.train.batch_size = 256 if tiny else 1024
    c.train.eval_batch_size = 1024 if tiny else 8192
    c.train.log_every = 5 if tiny else 50
    # How the embedding table is updated (train/sparse.py): "dense_adam" (optax over every row),
    # "lazy_adam" or "rowwise_adagrad" (only the rows a batch touches). Row-wise Adagrad was the
    # fastest and matched dense Adam's test AUC (README "Sparse embedding updates").
    c.train.embedding_optimizer = "rowwise_adagrad"
    c.train.adagrad_learning_rate = 0.03  # rowwise_adagrad's step size for the table
    # A NaN/Inf loss or gradient norm (teacher, candidate fine-tune, distillation): "stop" ends
    # the phase naming the last good checkpoint; "skip_batch" leaves the state unchanged for
    # that step (docs/resuming.md). inject_nan: test switch, "<phase>:<step>" ("" = off).
    c.train.nan_policy = "stop"
    c.train.inject_nan = ""

    # ------------------------------------------------------------------ distill
    # DIET distillation (phase 1 boundary memory, phase 2 bi-level refinement).
    c.distill = ml_collections.ConfigDict()
    # Defaults chosen on the VALIDATION day by experiments/study_distill.py (docs/distillation.md
    # "Study"): percentile 0.9 -> 0.5 was the largest gain (DCN, phase 1 alone: 0.7397 -> 0.7923).
    # Phase 1: the EL2N rank kept per label group (0.9 = the paper's); used when strata = 1.
    c.distill.percentile = 0.5
    # Phase 1 rows from one EL2N window around `percentile` (1) or spread over S score levels
    # of each label group (S > 1: the middle of S equal rank ranges; 0: one range per row kept,
    # a sample stratified by score; `phase1.rank_windows`). Chosen on validation at the
    # fine-tune's rate 1e-3 (docs/distillation.md, "Phase 1 rows spread over the scores"):
    # DIET - (strata 1) +0.0013, +0.0047, +0.0003 on three replicates (seeds 0, 10, 20).
    c.distill.strata = 0
    # Where phase 1 takes each score range's row: "middle" (deterministic given the teacher) or
    # "random" (seeded by config.seed and the stage: a stratified random sample, so that each
    # evaluation seed can have its own distillation, evaluate.distill_per_seed).
    c.distill.strata_pick = "middle"
    # Phase 1's budget over label groups: "balanced" (equal shares) or "proportional" (as the
    # stage's label distribution). Chosen on the validation day by how DIET ranks the pool
    # (docs/distillation.md, "Label groups and the ranking"): balanced rows, with the rare
    # buy/like combinations over-represented 5x, rank it at Kendall -0.03 against Full Data,
    # proportional rows at 0.30 (Random 0.26), at the same pool-mean AUC.
    c.distill.group_split = "proportional"
    # Budget curve (group "budget"): 1 / 20 / 60 iterations gave 0.7999 / 0.8008 / 0.7910. On
    # the 30,000-row stages 10 cost 1.41x a full-data epoch and 6 fit it (bench_distill.py),
    # with the same validation AUC (DIET - Random +0.0063 vs +0.0067; docs/distillation.md).
    c.distill.outer_iterations = 8 if tiny else 6  # phase 2 iterations per stage
    # False: no phase 2; D_syn^t is phase 1's rows (fused, re-anchored, the teacher's logits).
    # Chosen on validation over the default's three replicates (9 seeds): without phase 2 the
    # pool mean is 0.6927 against 0.6914, 5 of 5 bases above Random against 4, tau 0.60 / 0.62
    # (docs/distillation.md, "Phase 2 under the current defaults"). `:tiny` keeps phase 2 on so
    # that the tests and the smoke run go through the whole of Algorithm 2.
    c.distill.refine = tiny
    c.distill.inner_steps = 4 if tiny else 10  # M: proxy SGD steps on the active memory
    c.distill.window = 2 if tiny else 5  # W: differentiated steps (RaT-BPTT)
    c.distill.inner_lr = 0.05
    # 3e-2 moved a refined row by ~0.1 per coordinate, the embeddings' own std, and cost 0.014
    # AUC (group "refine"); 3e-3 is neutral to slightly positive.
    c.distill.meta_lr_embed = 3e-3
    c.distill.meta_lr_labels = 1e-2
    c.distill.learn_labels = True  # soft labels are optimized with the embeddings
    # New rows' soft labels pulled toward their hard labels: logit((1-m) sigmoid(y~) + m y);
    # 0 = the teacher's logits (eq. 8). Selection baselines: evaluate.selection_label_mix.
    c.distill.label_mix = 0.0
    c.distill.max_grad_norm = 1.0  # meta-gradient clipping (global norm; 0 = off)
    # Targets per real minibatch: the whole batch (1.0) beat the paper's 0.1 of smallest
    # deficiency (0.7952 vs 0.7906, group "refine"); target_selection is then moot.
    c.distill.hard_fraction = 1.0
    c.distill.active_size = 0  # active memory rows; 0 = window x inner_steps (paper A.3)
    c.distill.batch_size = 0  # real minibatch; 0 = train.batch_size
    # Ablation switches (paper Table 4); off = the plain variant (no fusion / random subsets).
    # Memory fusion's retention at t > 1: "paper" keeps n_t old rows; "cumulative" keeps the
    # earlier budgets (D_syn^T as large as the selection baselines' rows).
    c.distill.retention = "cumulative"  # group "retention": 0.7923 (paper) -> 0.7999
    # Re-anchoring at fusion: carried rows re-embedded under phi_t's table and relabelled by
    # phi_t ("replace"; "offsets" keeps what refinement added; "off" = the paper's frozen rows).
    # Chosen on validation (docs/distillation.md "Re-anchoring"): DIET - Random +0.0067 (offsets),
    # +0.0034 (replace), +0.0010 (off) over the five bases.
    c.distill.reanchor = "offsets"
    c.distill.memory_fusion = True
    c.distill.target_selection = True
    c.distill.memory_selection = True
    c.distill.influence_at = "proxy"  # A(x, z) at the proxy's theta_0, or "teacher" (phi_t)
    # Phase 2's proxy: "" = the teacher's backbone, or a user module "package.module:Name" /
    # "file.py:Name" (docs/library.md), which returns `proxy_output` (representation | logits).
    c.distill.proxy_module = ""
    c.distill.proxy_output = "representation"
    c.distill.remat = tiny  # jax.checkpoint on the differentiated steps (compiles faster)
    c.distill.chunk_size = 256 if tiny else 8192  # rows per chunk in influence sums
    c.distill.address_pool = 256 if tiny else 512  # memory rows addressed per iteration; 0 = all
    c.distill.checkpoint_every = 0 if tiny else 10  # outer iterations between checkpoints
    c.distill.log_every = 2 if tiny else 5

    # ------------------------------------------------------------------ evaluate
    # Candidate evaluation protocol, baselines, fidelity and report.
    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.methods = DEFAULT_METHODS  # the paper's seven
    # The selection baselines' soft labels pulled toward the rows' hard labels, as
    # distill.label_mix does for DIET's (a control; 0 = the teacher's logits, the paper's).
    c.evaluate.selection_label_mix = 0.0
    # The candidate pool (evaluate/pool.py): "name:backbone[:key=value...]", overrides of
    # model.<backbone>. A candidate named like its backbone with no override is its base setting
    # (the paper's Table 3 view).
    c.evaluate.candidates = pool.TINY_POOL if tiny else pool.DEFAULT_POOL
    c.evaluate.models = ()  # names of the candidates to run; () = the whole pool
    c.evaluate.seeds = 1 if tiny else 3  # seeds config.seed, config.seed + 1, ... of every entry
    # DIET distilled once per evaluation seed (each with that seed as config.seed, under
    # <workdir>/seeds/seed<s>/distill), as Random draws its rows per seed; False: one
    # distillation (config.seed's) shared by every seed. Useful with distill.strata_pick
    # "random" or phase 2 on, whose rows depend on the seed.
    c.evaluate.distill_per_seed = False
    # Adam learning rates for the reduced-data epochs, chosen on validation AUC (paper 5.1.4).
    c.evaluate.lr_grid = (1e-3, 1e-2) if tiny else (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2)
    c.evaluate.learning_rate = 3e-3 if tiny else 1e-3  # used when lr_grid is ()
    # Adam rates for Full Data, Cold and Warmup Start (train.learning_rate when ()): the paper
    # tunes every model; each rate is a whole run, so the default keeps one (docs/evaluation.md).
    c.evaluate.reference_lr_grid = ()
    # Re-estimate BatchNorm statistics on the subsequent block's batches before testing ("precise
    # BN", every method alike): after the short fine-tune the running averages still remember the
    # rows a reduced method trained on. Chosen on validation with finetune_adam = "rows"
    # (docs/evaluation.md, "The fine-tune"): +0.0005 to +0.0027 for the reduced methods.
    c.evaluate.precise_bn = True
    # A reduced method's fine-tune on the subsequent block: its Adam rate ("train" =
    # train.learning_rate, "rows" = the rate chosen for its rows, or a rate such as "3e-3") and
    # its dense Adam moments
    # ("fresh", or "rows": continued from the rows phase's best epoch). Chosen on validation
    # (docs/evaluation.md, "The fine-tune"): fresh moments make the first steps lr x sign(g) on
    # every weight, which cost the reduced methods 0.007-0.013 validation AUC at 1e-2. The rate:
    # 1e-3 against train.learning_rate (1e-2), on validation, synthetic default: Random +0.0042
    # ± 0.0010, DIET +0.0008 ± 0.0010; MovieLens: both higher at every step down from 1e-2
    # (docs/evaluation.md, "The fine-tune's rate"). `:tiny` keeps train.learning_rate.
    c.evaluate.finetune_lr = "train" if tiny else "1e-3"
    # The rows' learning rate is chosen by the validation AUC of the best rows epoch ("rows"),
    # or of each rate's model after the fine-tune ("final": the model the protocol reports, as
    # for evaluate.reference_lr_grid), for the lr_select_top rates best by the rows' AUC (0 =
    # every rate): that many fine-tunes on the first seed instead of one. Chosen on validation
    # (docs/evaluation.md, "Choosing the rate on the final model"): the rows' AUC picks rates
    # whose fine-tuned models collapse (WuKong, FinalMLP); "final" lifts every reduced method,
    # DIET most; the full search's choice lies in the rows' top 3 for 29 of 30 entries. :tiny
    # fine-tunes its rows' best rate only (the same result as "rows"), to stay short.
    c.evaluate.lr_select = "final"
    c.evaluate.lr_select_top = 1 if tiny else 3
    c.evaluate.finetune_adam = "rows"
    # Epochs on the reduced rows, best by validation AUC (the paper: up to 8). 4 at batch 128
    # (evaluate.rows_batch_size) since stop 36: the same 48 Adam steps as 8 epochs at 256 in
    # half the passes over the rows, chosen on validation over 9 seeds (docs/evaluation.md,
    # "Half the passes, the same steps"): DIET's tau against Full Data 0.71 against 0.56 (Random
    # 0.68 against 0.52), for 0.003 of DIET's pool-mean AUC and one base above Random.
    c.evaluate.max_epochs = 3 if tiny else 4
    # The rate grid pruned as it trains (successive halving, one round): after lr_prune_epochs
    # epochs only the lr_prune_keep rates best by validation AUC so far go on; the others keep
    # their best of those epochs (0 = every rate trains every epoch). At least lr_select_top.
    # Off by default (docs/evaluation.md, "Pruning the rate grid"): at (2, 3) the default run
    # took 5% less wall time with 97 of its 105 entries identical, but two epochs' AUCs are a
    # noisy guide (8 entries lost a rate that would have ended in the rows' top 3), and EL2N
    # lost 0.0014 of validation AUC. `:tiny` prunes, so that the smoke run and the tests go
    # through it.
    c.evaluate.lr_prune_epochs = 2 if tiny else 0
    c.evaluate.lr_prune_keep = 1 if tiny else 3
    # Methods that inherit the teacher's table (Warmup Start, the reduced ones) continue its
    # row-optimizer state in the fine-tune; False = fresh accumulators (docs/evaluation.md).
    c.evaluate.inherit_optimizer = True
    # Groups of rows trainings (the LR grid, the seeds) as one vmapped model ("vmap"), one after
    # another ("sequential"), or "auto": vmap on an accelerator, sequential on the CPU.
    c.evaluate.group_mode = "auto"
    # Validation rows scored after every rows epoch (a seeded subsample; 0 = all): the epoch and
    # learning-rate selection scores (grid + seeds) x epochs models, so the full day is costly.
    c.evaluate.val_rows = 0 if tiny else 2048
    c.evaluate.bootstrap = 1000  # bootstrap resamples of the rank correlations (0 = none)
    c.evaluate.rows_batch_size = 64 if tiny else 128  # see evaluate.max_epochs
    c.evaluate.el2n_percentile = 0.9  # the EL2N baseline keeps the rows around this score rank
    c.evaluate.kmeans_clusters = 8 if tiny else 128
    c.evaluate.kmeans_iters = 5 if tiny else 20
    c.evaluate.kmeans_max_rows = 200_000  # K-means runs on a seeded subsample of larger stages
    c.evaluate.rerun = False  # True: recompute (method, model) entries already in results.json

    # ------------------------------------------------------------------ parallel
    # Scale-out (diet_jax/parallel.py, README "Scale-out"): a mesh with a `data` axis, batches
    # split along it, parameters replicated. Off in `:tiny` so that tests keep one device.
    c.parallel = ml_collections.ConfigDict()
    c.parallel.enabled = not tiny
    c.parallel.data_axis_size = 0  # devices on the data axis; 0 = every device JAX sees
    c.parallel.shard_embeddings = False  # row-shard the embedding table (and its moments)
    c.parallel.distributed = False  # call jax.distributed.initialize (multi-host)
    c.parallel.coordinator_address = ""  # "host:port" of process 0; "" = auto-detect
    c.parallel.num_processes = 0  # 0 = auto-detect
    c.parallel.process_id = -1  # -1 = auto-detect
    return c
