"""The short teaching text at the top of every tab (two sentences each) and a few labels."""

TITLE = "HFPrune Studio"
SUBTITLE = ("Structured pruning of transformer MLPs, scored by the entropy of the model's own predictions "
            "(HFPrune) and compared with the classic cross-entropy score.")

MODEL_DATA = (
    "A criterion can only judge a neuron by watching it work, so pick the model to shrink and the text it reads "
    "while it is being watched. A handful of short windows is enough on a laptop CPU; more windows give steadier "
    "scores at the cost of time."
)

IMPORTANCE = (
    "Every MLP neuron gets a score for how much the model would suffer without it: the Taylor criteria multiply the "
    "neuron's activation by the gradient of their loss flowing back into it, the forward-only ones (Wanda, "
    "fluctuation) weigh its activations by its outgoing weights, and magnitude looks at the weights alone. Scores "
    "near zero mark the neurons that can go with the least damage, and the plots show how unevenly that importance "
    "is spread within and across layers."
)

CRITERIA = (
    "Cross-entropy only asks whether the word that really came next is still predicted, while entropy asks whether "
    "the model's whole spread of guesses keeps its shape. Where the two rankings part ways, the entropy score is "
    "protecting neurons that serve the alternatives this particular text did not happen to use."
)

PRUNE = (
    "Pruning keeps the top-scoring neurons of each layer and cuts the rest out of the weight matrices, so the model "
    "really becomes smaller and cheaper to run. Watch the preview while you move the ratio, then name the variant to "
    "compare it or export it."
)

COMPENSATION = (
    "Cutting neurons loses what they added to the layer's output. The kept neurons often move together with the "
    "cut ones, so their outgoing weights can be re-solved (a small least-squares fit on calibration text) to put "
    "most of that lost output back. Same size, same speed, usually much closer to the original."
)

COMPARE = (
    "A pruned model can keep the same favourite word while its confidence in every other candidate drifts, so the "
    "bars put the full next-token menus of the original and each variant side by side. The coloured text marks, "
    "token by token, how far a variant's prediction moved away from the original's (KL divergence), and the table "
    "adds perplexity and agreement numbers."
)

EVALUATE = (
    "Pruning removes neurons and quantization stores the remaining weights in fewer bits; the two stack, and only "
    "measurement says what they buy. Quantize any variant here, ask it multiple-choice and fill-the-gap questions "
    "built from held-out Wikipedia articles, and time it: the Pareto plot shows which variants are both small and good."
)

RUNS = (
    "Each scoring and pruning run is saved on disk with its settings, scores, results and timestamps, so it survives "
    "a restart of the app. Load a run to bring its scores or its pruned model back into this session, or delete "
    "the ones you no longer need."
)

DEFAULT_PROMPT = "The history of the printing press"
DEFAULT_CONTEXT = "The capital of France is"
DEFAULT_KL_TEXT = ("The river flows through the centre of the city, and its banks are lined with old stone houses. "
                   "In the nineteenth century the town became an important centre of the textile industry.")
