"""Mutation tests of Phase 4's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
shortcuts through a library or the course's own references earn nothing (SHORTCUTS, run by
tests/test_shortcuts_every_phase.py), and (with tests/test_exercises_every_phase.py) the untouched
stub earns nothing."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/04_scaling_laws/scaling_laws.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex8"]

check_correct = NB.assert_full_marks
check_wrong = NB.assert_loses_points


def test_phase_has_the_eight_exercises_in_order():
    assert NB.exercises() == EXERCISES


# ---------------------------------------------------------------------------------------------
# Exercise 1: parameters and FLOPs
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "a list of every tensor's shape, and FLOPs per layer": '''
def count_parameters(config):
    d, b = config.n_embd, int(config.bias)
    shapes = [(config.vocab_size, d), (config.block_size, d), (d,), (b * d,)]   # embeddings, final LayerNorm
    for _ in range(config.n_layer):
        shapes += [(d,), (b * d,), (d,), (b * d,)]                     # two LayerNorms
        shapes += [(3 * d, d), (b * 3 * d,), (d, d), (b * d,)]         # attention
        shapes += [(4 * d, d), (b * 4 * d,), (d, 4 * d), (b * d,)]     # MLP
    return int(sum(math.prod(s) for s in shapes))


def forward_flops_per_token(config, seq_len):
    d = config.n_embd
    per_layer = 2 * (3 * d * d + d * d + 4 * d * d + d * 4 * d) + 2 * seq_len * d + 2 * seq_len * d
    return config.n_layer * per_layer + 2 * d * config.vocab_size
''',
}

EX1_WRONG = {
    "the tied unembedding counted twice": (("return V * d + T * d +", "return 2 * V * d + T * d +"), "counted a second time"),
    "no position embedding": (("return V * d + T * d +", "return V * d +"), "position embedding"),
    "config.bias ignored": (("b = 1 if config.bias else 0", "b = 1"), None),
    "6 FLOPs per weight": (("return 2 * weights_in_products + attention", "return 6 * weights_in_products + 3 * attention"),
                           "training step"),
    "no attention term": (("return 2 * weights_in_products + attention", "return 2 * weights_in_products"),
                          "attention term left out"),
    "Kaplan's single attention product": (("attention = L * 2 * (2 * seq_len * d)", "attention = L * 2 * seq_len * d"),
                                          "Kaplan"),
    "a float, not an int": (("return 2 * weights_in_products + attention", "return float(2 * weights_in_products + attention)"),
                            "Python int"),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    check_correct("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    replacement, message = EX1_WRONG[name]
    check_wrong("ex1", mutate("ex1", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 2: a power law with a floor
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "np.polyfit per floor and a golden-section search": '''
def fit_power_law(x, y):
    lx = np.log(np.asarray(x, dtype=float))
    yy = np.asarray(y, dtype=float)
    ly = np.log(yy)

    def profile(e):
        slope, intercept = np.polyfit(lx, np.log(yy - e), 1)
        return float(np.sum((np.log(e + np.exp(intercept + slope * lx)) - ly) ** 2)), intercept, slope

    top = yy.min() * (1 - 1e-9)
    grid = np.linspace(0.0, top, 400)
    i = int(np.argmin([profile(e)[0] for e in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if profile(m1)[0] < profile(m2)[0]:
            hi = m2
        else:
            lo = m1
    e = (lo + hi) / 2
    _, intercept, slope = profile(e)
    return float(e), float(np.exp(intercept)), float(-slope)
''',
}

EX2_WRONG = {
    "no floor (a straight line in log-log space)": (("floor = float(floors[best])", "floor = 0.0"), "no floor"),
    "a single coarse grid over E": (("for _ in range(6):", "for _ in range(1):"), None),
    "least squares on y, not log y": (("return float(((fitted - log_y) ** 2).sum()), log_a, alpha",
                                       "return float(((fitted.exp() - y) ** 2).sum()), log_a, alpha"), None),
}


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_alternatives_get_full_marks(name):
    check_correct("ex2", EX2_CORRECT[name])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    replacement, message = EX2_WRONG[name]
    check_wrong("ex2", mutate("ex2", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 3: Approach 2
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "np.polyfit in log10, b as 1 - a": '''
def isoflop_minimum(n_params, losses):
    u = np.log10(np.asarray(n_params, dtype=float))
    c2, c1, c0 = np.polyfit(u, np.asarray(losses, dtype=float), 2)
    return float(10 ** (-c1 / (2 * c2)))


def allocation_exponents(budgets, n_opt):
    a, _ = np.polyfit(np.log10(np.asarray(budgets, dtype=float)), np.log10(np.asarray(n_opt, dtype=float)), 1)
    return float(a), float(1 - a)
''',
}

EX3_WRONG = {
    "the grid point with the lowest loss": (("return math.exp(-c1 / (2 * c2))",
                                            "return float(torch.as_tensor(n_params, dtype=torch.float64)[losses.argmin()])"),
                                           "not the parabola's vertex"),
    "the parabola in N, not log N": (("u = torch.as_tensor(n_params, dtype=torch.float64).log()",
                                      "u = torch.as_tensor(n_params, dtype=torch.float64)"), None),
    "log N returned": (("return math.exp(-c1 / (2 * c2))", "return -c1 / (2 * c2)"), "log N, not N"),
    "the vertex's sign": (("return math.exp(-c1 / (2 * c2))", "return math.exp(c1 / (2 * c2))"), None),
    "log C regressed on log N": (("a = torch.linalg.lstsq(design, log_n.unsqueeze(1)).solution[0, 0]",
                                  "a = 1 / torch.linalg.lstsq(design, log_n.unsqueeze(1)).solution[0, 0]"), "1/a"),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    check_correct("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    replacement, message = EX3_WRONG[name]
    check_wrong("ex3", mutate("ex3", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 4: the compute-optimal allocation in closed form
# ---------------------------------------------------------------------------------------------

EX4_CORRECT = {
    "exponents written through a = beta / (alpha + beta), D from the constraint": '''
def compute_optimal(compute, fit):
    alpha, beta, A, B = fit["alpha"], fit["beta"], fit["A"], fit["B"]
    a = beta / (alpha + beta)
    n = ((alpha * A) / (beta * B)) ** (1 / (alpha + beta)) * (compute / 6) ** a
    return float(n), float(compute / (6 * n))
''',
}

EX4_WRONG = {
    "the exponents swapped": (("n_opt = g * (compute / 6.0) ** (beta / (alpha + beta))",
                               "n_opt = g * (compute / 6.0) ** (alpha / (alpha + beta))"), None),
    "G inverted": (("g = (alpha * fit[\"A\"] / (beta * fit[\"B\"])) ** (1.0 / (alpha + beta))",
                    "g = (beta * fit[\"B\"] / (alpha * fit[\"A\"])) ** (1.0 / (alpha + beta))"), None),
    "C, not C / 6": (("n_opt = g * (compute / 6.0) ** (beta / (alpha + beta))",
                      "n_opt = g * compute ** (beta / (alpha + beta))"), None),
    "D = C / N": (("d_opt = (compute / 6.0) ** (alpha / (alpha + beta)) / g", "d_opt = compute / n_opt"), "D_opt must be C / (6 N_opt)"),
}


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_alternatives_get_full_marks(name):
    check_correct("ex4", EX4_CORRECT[name])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    replacement, message = EX4_WRONG[name]
    check_wrong("ex4", mutate("ex4", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 5: Approach 3 (each run fits several data sets: few, chosen mutations)
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "Huber written by hand, itertools.product grid, five starts": '''
import itertools


def fit_chinchilla(n_params, n_tokens, losses):
    log_n = torch.log(torch.as_tensor(n_params, dtype=torch.float64))
    log_d = torch.log(torch.as_tensor(n_tokens, dtype=torch.float64))
    log_l = torch.log(torch.as_tensor(losses, dtype=torch.float64))

    def objective(theta):
        a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))
        pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(*e.shape[:-1], len(log_n))]), dim=0)
        r = (pred - log_l).abs()
        delta = 1e-3
        return torch.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta)).sum(-1)

    grid = torch.tensor(list(itertools.product([0, 5, 10, 15, 20, 25], [0, 5, 10, 15, 20, 25], [-1, -0.5, 0, 0.5, 1],
                                               [0, 0.5, 1, 1.5, 2], [0, 0.5, 1, 1.5, 2])), dtype=torch.float64)
    with torch.no_grad():
        order = objective(grid).argsort()
    results = []
    for start in grid[order[:5]]:
        theta = start.clone().requires_grad_()
        opt = torch.optim.LBFGS([theta], max_iter=400, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-13, tolerance_change=1e-16)

        def closure():
            opt.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        opt.step(closure)
        results.append((float(objective(theta.detach())), theta.detach()))
    a, b, e, alpha, beta = min(results, key=lambda r: r[0])[1].tolist()
    return dict(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)
''',
}

EX5_WRONG = {
    "squared error, not Huber": (('F.huber_loss(residual, torch.zeros_like(residual), reduction="none", delta=1e-3)',
                                  "(residual ** 2)"), "should ignore them"),
    "log A and log B returned": (('return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}',
                                  'return {"E": math.exp(e), "A": a, "B": b, "alpha": alpha, "beta": beta}'), None),
}


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    check_correct("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    replacement, message = EX5_WRONG[name]
    check_wrong("ex5", mutate("ex5", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 6: the entropy rate of a Markov chain
# ---------------------------------------------------------------------------------------------

EX6_CORRECT = {
    "stationary distribution from a linear solve": '''
def entropy_rate(transition):
    p = transition.double()
    s = p.shape[0]
    system = torch.cat([(p.T - torch.eye(s, dtype=torch.float64)), torch.ones(1, s, dtype=torch.float64)])
    rhs = torch.zeros(s + 1, dtype=torch.float64)
    rhs[-1] = 1.0
    pi = torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution.squeeze(1)
    plogp = torch.special.xlogy(p, p)
    return float(-(pi * plogp.sum(1)).sum())
''',
}

EX6_WRONG = {
    "rows weighted equally": (("return float(pi @ row_entropies)", "return float(row_entropies.mean())"), "weighted equally"),
    "bits": (("row_entropies = -(p * safe.log()).sum(dim=1)", "row_entropies = -(p * safe.log2()).sum(dim=1)"), "bits"),
    "P pi instead of pi P": (("new = pi @ p", "new = p @ pi\n        new = new / new.sum()"), None),
    "0 log 0 left as NaN": (("row_entropies = -(p * safe.log()).sum(dim=1)", "row_entropies = -(p * p.log()).sum(dim=1)"),
                            "0 log 0"),
}


@pytest.mark.parametrize("name", EX6_CORRECT)
def test_ex6_correct_alternatives_get_full_marks(name):
    check_correct("ex6", EX6_CORRECT[name])


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    replacement, message = EX6_WRONG[name]
    check_wrong("ex6", mutate("ex6", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 7: the budget game
# ---------------------------------------------------------------------------------------------

EX7_CORRECT = {
    "IsoFLOP profiles with the course's fitting references": '''
def predict_optimal_size(query, budget, target_compute):
    budgets = [budget / 2000, budget / 200, budget / 25]
    n_opts = []
    for c in budgets:
        sizes = math.sqrt(c / 120) * np.logspace(-2, 2, 9)
        losses = [query(n, c / (6 * n)) for n in sizes]
        centre = sizes[int(np.argmin(losses))]
        sizes = centre * np.logspace(-0.5, 0.5, 9)
        n_opts.append(scaling.isoflop_minimum(sizes, [query(n, c / (6 * n)) for n in sizes]))
    a, _ = scaling.allocation_exponents(budgets, n_opts)
    return float(n_opts[-1] * (target_compute / budgets[-1]) ** a)
''',
}

EX7_WRONG = {
    "more experiments than the budget pays for": (("budgets = [budget / 3000, budget / 300, budget / 30]",
                                                   "budgets = [budget / 300, budget / 30, budget / 3]"), None),
    "the exponent 0.5 assumed, not measured": (("return float(n_opts[-1] * (target_compute / budgets[-1]) ** a)",
                                                "return float(n_opts[-1] * (target_compute / budgets[-1]) ** 0.5)"), None),
    "20 tokens per parameter at the target, no experiment": (("budgets = [budget / 3000, budget / 300, budget / 30]",
                                                              "return math.sqrt(target_compute / 120)"), None),
}


@pytest.mark.parametrize("name", EX7_CORRECT)
def test_ex7_correct_alternatives_get_full_marks(name):
    check_correct("ex7", EX7_CORRECT[name])


@pytest.mark.parametrize("name", EX7_WRONG)
def test_ex7_mistakes_lose_points(name):
    replacement, message = EX7_WRONG[name]
    check_wrong("ex7", mutate("ex7", replacement), message)


# ---------------------------------------------------------------------------------------------
# Exercise 8: the context as a rank-1 weight update
# ---------------------------------------------------------------------------------------------

EX8_CORRECT = {
    "the pseudo-inverse of A(x) as a column": '''
def implicit_update(block, tokens):
    a_x = block.attend(tokens[-1:]).unsqueeze(1)
    shift = block.fc1.weight @ (block.attend(tokens) - block.attend(tokens[-1:]))
    return shift.unsqueeze(1) @ torch.linalg.pinv(a_x)
''',
}

EX8_WRONG = {
    "divided by the norm": (("return torch.outer(effect, alone) / (alone @ alone)",
                             "return torch.outer(effect, alone) / alone.norm()"), "not its square"),
    "outer product with A(C, x)": (("return torch.outer(effect, alone) / (alone @ alone)",
                                    "return torch.outer(effect, with_context) / (alone @ alone)"), "instead of A(x)"),
    "no W (the update of the attention output)": (("effect = block.fc1.weight @ (with_context - alone)",
                                                   "effect = with_context - alone"), None),
}


@pytest.mark.parametrize("name", EX8_CORRECT)
def test_ex8_correct_alternatives_get_full_marks(name):
    check_correct("ex8", EX8_CORRECT[name])


@pytest.mark.parametrize("name", EX8_WRONG)
def test_ex8_mistakes_lose_points(name):
    replacement, message = EX8_WRONG[name]
    check_wrong("ex8", mutate("ex8", replacement), message)


# ---------------------------------------------------------------------------------------------
# Shortcuts: the course's references and libraries earn nothing
# ---------------------------------------------------------------------------------------------

SHORTCUTS = {
    "ex1": {
        "build the model and count, and FlopCounterMode for the FLOPs": '''
def count_parameters(config):
    return GPT(config).num_parameters()


def forward_flops_per_token(config, seq_len):
    model = GPT(config)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, seq_len, dtype=torch.long))
    return int(counter.get_total_flops() // seq_len + 4 * config.n_layer * seq_len * config.n_embd)
''',
        "the course's meta-device count (scaling.gpt_parameters)": '''
def count_parameters(config):
    return scaling.gpt_parameters(config)


def forward_flops_per_token(config, seq_len):
    n = scaling.gpt_parameters(config, non_embedding=True) + config.vocab_size * config.n_embd
    return int(2 * n + 4 * config.n_layer * seq_len * config.n_embd)
''',
    },
    "ex2": {
        "the course's reference fit (scaling.fit_power_law)": '''
def fit_power_law(x, y):
    return scaling.fit_power_law(x, y)
''',
    },
    "ex3": {
        "the course's Approach 2 (scaling.isoflop_minimum, scaling.allocation_exponents)": '''
def isoflop_minimum(n_params, losses):
    return scaling.isoflop_minimum(n_params, losses)


def allocation_exponents(budgets, n_opt):
    return scaling.allocation_exponents(budgets, n_opt)
''',
    },
    "ex4": {
        "the course's closed form (scaling.compute_optimal)": '''
def compute_optimal(compute, fit):
    return scaling.compute_optimal(compute, fit)
''',
    },
    "ex5": {
        "the course's Approach 3 (scaling.fit_chinchilla)": '''
def fit_chinchilla(n_params, n_tokens, losses):
    return scaling.fit_chinchilla(n_params, n_tokens, losses)
''',
    },
    "ex6": {
        "the course's entropy rate (scaling.entropy_rate)": '''
def entropy_rate(transition):
    return scaling.entropy_rate(transition)
''',
    },
    "ex7": {
        "Chinchilla's published fit, no experiments": '''
def predict_optimal_size(query, budget, target_compute):
    return scaling.compute_optimal(target_compute)[0]
''',
    },
    "ex8": {
        "the course's reference update (scaling.implicit_weight_update)": '''
def implicit_update(block, tokens):
    return scaling.implicit_weight_update(block, tokens)
''',
    },
}


def test_every_exercise_has_a_shortcut_row():
    assert sorted(SHORTCUTS) == EXERCISES
