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

REGION = (
    "After the refit, go one step further: starting from the bottom layer, fit each shortened MLP (all three of "
    "its projections) so it gives what the original MLP gave for the very inputs the pruned model now feeds it. "
    "It costs about two more passes over its windows (plus the Adam steps, if any); each layer keeps the new "
    "weights only if they do better on text held back from the fit. Same size and speed as the refit alone."
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

# -- glossary: every term a table, a plot or a control uses, in plain words ----------------------------
GLOSSARY = {
    "entropy (criterion)": "The HFPrune score: how much a neuron matters to the *spread* of the model's own next-token "
                           "guesses (Taylor estimate on the entropy of its prediction). Needs no labels.",
    "cross_entropy (criterion)": "The classic score: how much a neuron matters to predicting the word that really came "
                                 "next in the calibration text.",
    "prediction entropy (metric)": "How unsure a model is about the next token, in nats: 0 = certain, higher = more "
                                   "spread out. A column in the fidelity tables, not the criterion.",
    "KL to original / to dense": "How far a variant's next-token distribution has moved from the original model's, "
                                 "averaged over held-out tokens (nats per token; 0 = identical).",
    "perplexity": "How surprised a model is by held-out text (lower is better); the original sets the baseline.",
    "top-1 agreement": "Share of held-out positions where the variant's most likely next token is the original's.",
    "top-10 overlap": "Average share of the original's ten most likely next tokens that the variant also ranks in "
                      "its top ten.",
    "held-out / evaluation text": "Text never used for scoring or calibration; quality is only ever measured on it.",
    "ratio": "The share of MLP neurons removed (0.3 = 30 % of them).",
    "allocation": "How the cut is spread over layers: uniform (the same share everywhere), global (one ranking "
                  "across layers), adaptive (each layer as far as a held-out loss allows).",
    "tol (tolerance)": "Adaptive search: the loss increase a layer may cause. The search tunes it until the widths "
                       "add up to the asked ratio; each try of a tolerance is one 'outer step'.",
    "halvings": "Adaptive search: binary-search steps per layer; fewer is faster and coarser.",
    "compensation (lsq)": "After the cut, each layer's output weights are refitted by least squares so the layer's "
                          "output stays close to the original's. Same size and speed.",
    "calibration draw / noise": "One sample of calibration text the scores are computed from. Disjoint draws give "
                                "somewhat different scores and cuts; a difference between two criteria that is no "
                                "larger than the spread between draws is calibration noise, not a finding.",
    "recovery": "A short training run after the cut that teaches the smaller model to predict what the original "
                "predicts (distillation on KL); here only the MLP weights train.",
    "max ÷ mean": "Per-layer summary: the largest neuron score divided by the layer's mean score (how spiky "
                  "importance is).",
    "top-10 % share": "Per-layer summary: the share of the layer's total score held by its 10 % most important "
                      "neurons.",
    "Spearman ρ": "Rank correlation of two criteria's scores within a layer: 1 = same order, 0 = unrelated.",
    "removal overlap": "Share of the neurons criterion A removes that criterion B removes too. Two random choices "
                       "of the same size overlap by the ratio itself — the dashed chance line.",
    "FLOP ideal": "The speed-up the cut could give at best: the original's arithmetic per token divided by the "
                  "variant's.",
    "spread (IQR)": "Timings are repeated; the interval shows the middle half of them (quartiles). A speed-up whose "
                    "interval includes the ideal or 1.00× cannot be read as a gain.",
    "acc / acc_norm": "Zero-shot accuracy (lm-eval's names): acc compares the choices' log-likelihoods, acc_norm "
                      "divides them by each choice's length first.",
    "± SE / chance": "Standard error of an accuracy from n questions (binomial: √(p(1−p)/n)); chance is what "
                     "guessing scores. Two accuracies closer than about 2 SE apart are not separated.",
}


def glossary_markdown() -> str:
    """The glossary as a two-column markdown table."""
    rows = "\n".join(f"| **{term}** | {text} |" for term, text in GLOSSARY.items())
    return "| term | meaning |\n|---|---|\n" + rows

SPLIT_INFO = ("Calibration and quality checks never share text: the built-in corpora hold out whole articles or "
              "paragraphs, and an uploaded file is split by document (every 4th held out) or, for one long text, "
              "by position (its last quarter held out).")

# -- the Tour: six steps, a few sentences each, to read aloud --------------------------------------------
TOUR_INTRO = (
    "Six clicks tell the whole HFPrune story on the default model (SmolLM2-135M) and text (Wikipedia): score the "
    "neurons two ways, cut the model both ways, check whether the difference is more than the noise of the "
    "calibration text, and heal the cut. Every step also fills the regular tabs, so after the tour you can open "
    "any of them and keep exploring."
)
TOUR_STEPS = (
    ("Score every neuron, two ways",
     ("We watch the model read a few passages of Wikipedia and ask, for every one of its 46,080 MLP neurons, how much "
      "the model would suffer without it. Cross-entropy asks about the word that really came next; entropy, the "
      "HFPrune score, asks about the whole spread of words the model was considering. Both read the same 8 short "
      "windows (512 tokens): quick, and, as step 4 shows, a noisy sample.")),
    ("Look at the distributions",
     ("Each panel shows how the scores of one criterion are spread inside three layers, on a log scale. Most neurons "
      "matter little and a few matter a lot, which is exactly why a model can lose some of them and keep working.")),
    ("Find where the two criteria disagree",
     ("The bars show, layer by layer, how many of the neurons entropy would remove cross-entropy would remove too; the "
      "dashed line is what two random choices would share. The table lists the neurons the two rank most "
      "differently. Whether those disagreements change the cut model is a question of measurement, and step 4 "
      "also asks how much a different sample of calibration text would change the same ranking.")),
    ("Cut 30 % of the MLP neurons, both ways",
     ("We now really remove 30 % of the MLP neurons, once ranked by entropy and once by cross-entropy, and the model "
      "shrinks from 134.5 M to 110.6 M parameters. The first table measures the price of the two cuts made from "
      "this one draw of 512 calibration tokens: how far each cut model's predictions moved from the original's "
      "(KL) and how its perplexity changed. One draw can rank the two cuts either way, so the figure and the "
      "second table repeat the cuts from four larger, disjoint draws of calibration text (precomputed): a "
      "difference between the criteria counts only where it stands clear of the spread between draws, and the "
      "sentences below say where it does.")),
    ("Read the next-token menus",
     ("Here is what the three models expect after 'The capital of France is': the original's full menu next to the "
      "two cut models'. Look at how much probability each cut model still gives the original's favourite and how "
      "spread out the rest of its menu has become (its entropy, in the legend); step 6 shows what brings a cut "
      "model's menu back.")),
    ("Heal the cut",
     ("A cut model does not have to stay as it came out. The least-squares refit re-solves each layer's outgoing "
      "weights so the kept neurons stand in for the removed ones (same size, same speed), and a "
      "minute of recovery trains the MLP weights to predict what the original predicts. Starting from the entropy "
      "cut of step 4, this step makes both and measures them on the same held-out text, menus included; its "
      "sentences say how far each one moved the cut back toward the original.")),
)
