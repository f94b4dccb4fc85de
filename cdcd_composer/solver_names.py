"""The sampler's solvers and its default, by name: no torch, so a command line can read them quickly."""

ODE_SOLVERS = ('euler', 'heun', 'exponential', 'dpmpp_2m')  # any trained model
DISTILLED = 'distilled'  # a distilled student's own
SOLVERS = (*ODE_SOLVERS, DISTILLED)
# The defaults of generate.py, eval.py, the training samples and the Hugging Face model's
# generate (`bench/sample.py --quality`): 24 steps + the argmax pass = 25 network evaluations.
DEFAULT_SOLVER = 'dpmpp_2m'
DEFAULT_STEPS = 24
