"""Mutation tests of Phase 7's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
and (with tests/test_exercises_every_phase.py) the untouched stub earns nothing. The tests launch real ranks (forked processes, gloo)."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/07_parallelism/parallelism.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex8"]


def test_phase_has_the_eight_exercises_in_order():
    assert NB.exercises() == EXERCISES


check_alternative = NB.assert_full_marks
check_mistake = NB.assert_loses_points


# ---------------------------------------------------------------------------------------------
# Exercise 1: model states per device
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "a table of sharding divisors": '''
def model_state_bytes(n_params, world_size, zero_stage):
    divisors = {0: (1, 1, 1), 1: (1, 1, world_size), 2: (1, world_size, world_size),
                3: (world_size, world_size, world_size)}[zero_stage]
    return sum(b * n_params / d for b, d in zip((2, 2, 12), divisors))
''',
    "one expression with conditionals": '''
def model_state_bytes(n_params, world_size, zero_stage):
    n = world_size
    return n_params * (2 / (n if zero_stage == 3 else 1) + 2 / (n if zero_stage >= 2 else 1)
                       + 12 / (1 if zero_stage == 0 else n))
''',
}

EX1_WRONG = {
    "no fp32 master weights (8 bytes of optimizer state)": (("12 * n_params", "8 * n_params"), "8 bytes of optimizer state"),
    "stage 1 shards the gradients too": (("if zero_stage >= 2:", "if zero_stage >= 1:"), "(that is stage 2)"),
    "stage 2 shards the parameters too": (("if zero_stage >= 3:", "if zero_stage >= 2:"), "(that is stage 3)"),
    "stages shifted by one": (("if zero_stage >= 1:", "if zero_stage > 1:"), None),
    "nothing divided": (("optimizer = optimizer / world_size", "optimizer = optimizer"), "nothing divided"),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    check_alternative("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    (old, new), message = EX1_WRONG[name]
    check_mistake("ex1", mutate("ex1", (old, new)), message)


def test_ex1_the_papers_numbers_hard_coded_lose_the_hidden_points():
    source = """
def model_state_bytes(n_params, world_size, zero_stage):
    return {0: 120e9, 1: 31.4e9, 2: 16.6e9, 3: 1.88e9}[zero_stage] * n_params / 7.5e9
"""
    check_mistake("ex1", source)


# ---------------------------------------------------------------------------------------------
# Exercise 2: ring all-reduce
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "batch_isend_irecv and a flat copy written back": '''
def ring_all_reduce(tensor):
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return tensor
    flat = tensor.reshape(-1).clone()
    chunks = list(flat.tensor_split(world))
    right, left = (rank + 1) % world, (rank - 1) % world
    for step in range(2 * (world - 1)):
        reducing = step < world - 1
        s = step if reducing else step - (world - 1)
        send_i = (rank - s) % world if reducing else (rank + 1 - s) % world
        recv_i = (rank - s - 1) % world if reducing else (rank - s) % world
        buffer = torch.empty_like(chunks[recv_i])
        ops = [dist.P2POp(dist.isend, chunks[send_i], right), dist.P2POp(dist.irecv, buffer, left)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if reducing:
            chunks[recv_i] += buffer
        else:
            chunks[recv_i].copy_(buffer)
    tensor.copy_(flat.view_as(tensor))
    return tensor
''',
    "blocking send and recv, even ranks sending first": '''
def ring_all_reduce(tensor):
    rank, world = dist.get_rank(), dist.get_world_size()
    flat = tensor.view(-1)
    bounds = [len(c) for c in flat.tensor_split(world)]
    starts = [sum(bounds[:i]) for i in range(world)]
    chunk = lambda i: flat[starts[i]:starts[i] + bounds[i]]

    def exchange(send_index, recv_index):
        incoming = torch.empty(bounds[recv_index], dtype=tensor.dtype)
        if rank % 2 == 0:
            dist.send(chunk(send_index).contiguous(), (rank + 1) % world)
            dist.recv(incoming, (rank - 1) % world)
        else:
            dist.recv(incoming, (rank - 1) % world)
            dist.send(chunk(send_index).contiguous(), (rank + 1) % world)
        return incoming

    for step in range(world - 1):
        i = (rank - step - 1) % world
        chunk(i).add_(exchange((rank - step) % world, i))
    for step in range(world - 1):
        i = (rank - step) % world
        chunk(i).copy_(exchange((rank + 1 - step) % world, i))
    return tensor
''',
}

EX2_WRONG = {
    "all-gather phase missing": (
        ("    for step in range(world - 1):  # all-gather\n", "    for step in range(0):  # all-gather\n"),
        "the all-gather phase missing", None),
    "wrong chunk received in reduce-scatter": (
        ("(rank - step) % world, (rank - step - 1) % world", "(rank - step) % world, (rank - step + 1) % world"),
        None, "ex2_test_sum"),
    "average instead of sum": (("    return tensor\n    ### END", "    tensor /= world\n    return tensor\n    ### END"),
                               "an average instead of a sum", None),
    "the built-in all_reduce": (("    if world == 1:\n        return tensor\n",
                                 "    dist.all_reduce(tensor)\n    return tensor\n"), "send/recv", "ex2_test_ring"),
}

NAIVE_EXCHANGE = '''
def ring_all_reduce(tensor):
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = tensor.clone()
    requests = [dist.isend(mine, dst=other) for other in range(world) if other != rank]
    for other in range(world):
        if other != rank:
            incoming = torch.empty_like(tensor)
            dist.recv(incoming, src=other)
            tensor += incoming
    for request in requests:
        request.wait()
    return tensor
'''

NOT_IN_PLACE = '''
def ring_all_reduce(tensor):
    result = tensor.clone()
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = list(result.view(-1).tensor_split(world))
    right, left = (rank + 1) % world, (rank - 1) % world
    for step in range(world - 1):
        send_index, recv_index = (rank - step) % world, (rank - step - 1) % world
        incoming = torch.empty_like(chunks[recv_index])
        request = dist.isend(chunks[send_index], dst=right)
        dist.recv(incoming, src=left)
        request.wait()
        chunks[recv_index] += incoming
    for step in range(world - 1):
        send_index, recv_index = (rank + 1 - step) % world, (rank - step) % world
        request = dist.isend(chunks[send_index], dst=right)
        dist.recv(chunks[recv_index], src=left)
        request.wait()
    return result
'''


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_alternatives_get_full_marks(name):
    check_alternative("ex2", EX2_CORRECT[name])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    (old, new), message, cell = EX2_WRONG[name]
    check_mistake("ex2", mutate("ex2", (old, new)), message, cell)


def test_ex2_missing_all_gather_is_named():
    outcome = NB.run("ex2", mutate("ex2", ("    for step in range(world - 1):  # all-gather\n",
                                           "    for step in range(0):  # all-gather\n")))
    assert "hold the full sum. Is the all-gather phase missing" in outcome.errors["ex2_test_sum"]


def test_ex2_sending_whole_tensors_is_correct_but_not_a_ring():
    outcome = NB.run("ex2", NAIVE_EXCHANGE)
    assert outcome.earned["ex2_test_sum"] > 0, "the sum is right"
    assert outcome.earned["ex2_test_ring"] == 0
    assert "Are whole tensors sent instead of chunks?" in outcome.errors["ex2_test_ring"]


def test_ex2_a_new_tensor_instead_of_in_place_loses_points():
    outcome = NB.run("ex2", NOT_IN_PLACE)
    assert outcome.earned["ex2_test_sum"] == 0
    assert "in place" in outcome.errors["ex2_test_sum"]


def test_ex2_the_built_in_all_reduce_earns_nothing_and_is_named():
    outcome = NB.run("ex2", SHORTCUTS["ex2"]["dist.all_reduce"])
    assert sum(outcome.earned.values()) == 0
    assert "the collectives are switched off here" in outcome.errors["ex2_test_sum"]


def test_ex2_blocking_sends_deadlock_and_fail_with_a_timeout():
    source = mutate("ex2", (
        "        request = dist.isend(chunks[send_index], dst=right)\n        dist.recv(incoming, src=left)\n"
        "        request.wait()\n",
        "        dist.send(chunks[send_index], dst=right)\n        dist.recv(incoming, src=left)\n"))
    outcome = NB.run("ex2", source)
    assert sum(outcome.earned.values()) == 0
    assert "timed out" in outcome.errors["ex2_test_sum"] and "in ring_all_reduce" in outcome.errors["ex2_test_sum"]


# ---------------------------------------------------------------------------------------------
# Exercise 3: data-parallel gradient averaging
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "one flat bucket": '''
def average_gradients(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bucket = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(bucket)
    bucket /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(bucket[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
''',
    "divide first, asynchronous all-reduces": '''
def average_gradients(model):
    requests = []
    for p in model.parameters():
        if p.grad is None:
            continue
        p.grad.div_(dist.get_world_size())
        requests.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
    for request in requests:
        request.wait()
''',
}

EX3_WRONG = {
    "no division": (("            p.grad /= world\n", ""), "the sum over the ranks, not the average"),
    "parameters averaged instead of gradients": (("dist.all_reduce(p.grad)", "dist.all_reduce(p.data)"),
                                                 "the gradients were not all-reduced"),
    "nothing communicated": (("dist.all_reduce(p.grad)", "pass"), "the gradients were not all-reduced"),
    "None gradients not skipped": (("        if p.grad is not None:\n            dist.all_reduce(p.grad)\n"
                                    "            p.grad /= world\n",
                                    "        dist.all_reduce(p.grad)\n        p.grad /= world\n"), None),
    "divided twice": (("            p.grad /= world\n", "            p.grad /= world * world\n"), None),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    check_alternative("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    (old, new), message = EX3_WRONG[name]
    check_mistake("ex3", mutate("ex3", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 4: DDP's buckets, overlapped with the backward pass
# ---------------------------------------------------------------------------------------------

EX4_HEADER = NB.solution_source("ex4").split("        ### BEGIN SOLUTION\n")[0]

EX4_CORRECT = {
    "a set of ready parameters, averages divided first, new .grad tensors": EX4_HEADER + """
        self.ready_params, self.requests = set(), {}
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p):
        self.ready_params.add(p)
        i = self.bucket_of[p]
        if all(q in self.ready_params for q in self.buckets[i]):
            flat = torch.cat([q.grad.flatten() for q in self.buckets[i]]) / self.world
            self.requests[i] = (flat, dist.all_reduce(flat, async_op=True))

    def finish(self):
        for i, (flat, request) in self.requests.items():
            request.get_future().wait()
            for q, piece in zip(self.buckets[i], flat.split([q.numel() for q in self.buckets[i]])):
                q.grad = piece.view_as(q).clone()
        self.ready_params, self.requests = set(), {}
""",
    "torch's flatten helpers, a countdown per bucket": EX4_HEADER + """
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        self.flatten, self.unflatten = _flatten_dense_tensors, _unflatten_dense_tensors
        self.left = [len(b) for b in self.buckets]
        self.works = []
        for bucket in self.buckets:
            for p in bucket:
                p.register_post_accumulate_grad_hook(lambda p: self._grad_ready(p))

    def _grad_ready(self, p):
        i = self.bucket_of[p]
        self.left[i] -= 1
        if self.left[i] == 0:
            flat = self.flatten([q.grad for q in self.buckets[i]])
            self.works.append((self.buckets[i], flat, dist.all_reduce(flat, async_op=True)))

    def finish(self):
        while self.works:
            bucket, flat, work = self.works.pop()
            work.wait()
            for q, average in zip(bucket, self.unflatten(flat / self.world, [q.grad for q in bucket])):
                q.grad.copy_(average)
        self.left = [len(b) for b in self.buckets]
""",
}

EX4_WRONG = {
    "the all-reduce waits inside the hook": ((
        "            self.pending.append((i, flat, dist.all_reduce(flat, async_op=True)))\n",
        "            request = dist.all_reduce(flat, async_op=True)\n            request.wait()\n"
        "            self.pending.append((i, flat, request))\n"),
        "the all-reduces block the backward pass", "ex4_test_buckets_overlap"),
    "all-reduces launched in finish": ((
        "            self.pending.append((i, flat, dist.all_reduce(flat, async_op=True)))\n",
        "            self.pending.append((i, flat, None))\n"), None, None),
    "no division": (("            flat /= self.world\n", ""), "the sum over the ranks, not the average",
                    "ex4_test_gradients"),
    "counts not reset for the next backward pass": ((
        "        self.pending, self.ready = [], [0] * len(self.buckets)\n", ""), None, "ex4_test_gradients"),
}

LAUNCHED_IN_FINISH = NB.mutate("ex4", (
    "            self.pending.append((i, flat, dist.all_reduce(flat, async_op=True)))\n",
    "            self.pending.append((i, flat, None))\n"), (
    "            request.wait()\n", "            dist.all_reduce(flat)\n"))

ONE_PER_PARAMETER = EX4_HEADER + """
        self.requests = []
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p):
        self.requests.append((p, dist.all_reduce(p.grad, async_op=True)))

    def finish(self):
        for p, request in self.requests:
            request.wait()
            p.grad /= self.world
        self.requests = []
"""


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_alternatives_get_full_marks(name):
    check_alternative("ex4", EX4_CORRECT[name])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    (old, new), message, cell = EX4_WRONG[name]
    source = LAUNCHED_IN_FINISH if name == "all-reduces launched in finish" else mutate("ex4", (old, new))
    check_mistake("ex4", source, message, cell)


def test_ex4_all_reduces_after_the_backward_pass_lose_the_overlap_points():
    outcome = NB.run("ex4", LAUNCHED_IN_FINISH)
    assert outcome.earned["ex4_test_gradients"] > 0, "the gradients are right"
    assert outcome.earned["ex4_test_buckets_overlap"] == 0
    assert "launch each bucket from the hook" in outcome.errors["ex4_test_buckets_overlap"]


def test_ex4_one_all_reduce_per_parameter_loses_the_bucket_points():
    outcome = NB.run("ex4", ONE_PER_PARAMETER)
    assert outcome.earned["ex4_test_gradients"] > 0, "the gradients are right"
    assert outcome.earned["ex4_test_buckets_overlap"] == 0
    assert "one all-reduce per bucket" in outcome.errors["ex4_test_buckets_overlap"]


# ---------------------------------------------------------------------------------------------
# Exercise 5: the sharded optimizer
# ---------------------------------------------------------------------------------------------

EX5_HEADER = NB.solution_source("ex5").split("    @torch.no_grad()\n    def step(self):")[0]

EX5_CORRECT = {
    "list collectives, addcdiv as torch.optim.Adam writes it, new tensors each step": EX5_HEADER + '''
    @torch.no_grad()
    def step(self):
        flat = torch.zeros(self.shard_size * self.world)
        flat[:self.numel] = torch.cat([p.grad.flatten() for p in self.params])
        grad = torch.zeros(self.shard_size)
        dist.reduce_scatter(grad, list(flat.chunk(self.world)))
        grad = grad / self.world
        b1, b2 = self.betas
        self.steps += 1
        self.exp_avg_shard = b1 * self.exp_avg_shard + (1 - b1) * grad
        self.exp_avg_sq_shard = b2 * self.exp_avg_sq_shard + (1 - b2) * grad * grad
        denom = self.exp_avg_sq_shard.sqrt() / math.sqrt(1 - b2 ** self.steps) + self.eps
        params = torch.zeros(self.shard_size * self.world)
        params[:self.numel] = torch.cat([p.flatten() for p in self.params])
        mine = params[self.start:self.start + self.shard_size].addcdiv(
            self.exp_avg_shard, denom, value=-self.lr / (1 - b1 ** self.steps))
        shards = [torch.empty(self.shard_size) for _ in range(self.world)]
        dist.all_gather(shards, mine)
        full = torch.cat(shards)
        offset = 0
        for p in self.params:
            p.data.copy_(full[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
''',
    "a fp32 master shard kept next to the moments, lerp for the mean": EX5_HEADER + '''
    @torch.no_grad()
    def step(self):
        padded = self.shard_size * self.world
        flat_params = torch.nn.functional.pad(torch.cat([p.reshape(-1) for p in self.params]),
                                              (0, padded - self.numel))
        if not hasattr(self, "master_shard"):
            self.master_shard = flat_params[self.start:self.start + self.shard_size].clone()
        flat_grad = torch.nn.functional.pad(torch.cat([p.grad.reshape(-1) for p in self.params]),
                                            (0, padded - self.numel))
        grad = torch.empty(self.shard_size)
        distributed.reduce_scatter_single(grad, flat_grad.div(self.world))
        self.steps += 1
        self.exp_avg_shard.lerp_(grad, 1 - self.betas[0])
        self.exp_avg_sq_shard.lerp_(grad.square(), 1 - self.betas[1])
        m_hat = self.exp_avg_shard / (1 - self.betas[0] ** self.steps)
        v_hat = self.exp_avg_sq_shard / (1 - self.betas[1] ** self.steps)
        self.master_shard -= self.lr * m_hat / (torch.sqrt(v_hat) + self.eps)
        gathered = torch.empty(padded)
        distributed.all_gather_single(gathered, self.master_shard)
        for p, piece in zip(self.params, gathered[:self.numel].split([p.numel() for p in self.params])):
            p.copy_(piece.view_as(p))
''',
}

EX5_WRONG = {
    "gradients summed, not averaged": (("        grad_shard /= self.world\n", ""), "summed over the ranks, not averaged",
                                       None),
    "all-reduce instead of reduce-scatter": ((
        "        grad_shard = torch.empty(self.shard_size, dtype=flat_grad.dtype)\n"
        "        distributed.reduce_scatter_single(grad_shard, flat_grad)\n",
        "        dist.all_reduce(flat_grad)\n"
        "        grad_shard = flat_grad[self.start:self.start + self.shard_size].clone()\n"),
        "ZeRO reduce-scatters the gradients", "ex5_test_sharded"),
    "parameters not all-gathered": ((
        "        distributed.all_gather_single(flat_params, new_shard)\n",
        "        flat_params[self.start:self.start + self.shard_size] = new_shard\n"), None, "ex5_test_matches_adam"),
    "wrong shard": (("mine = flat_params[self.start:self.start + self.shard_size]",
                     "mine = flat_params[self.start:self.start + self.shard_size].roll(1)"), None,
                    "ex5_test_matches_adam"),
    "no bias correction": (("        m_hat = self.exp_avg_shard / (1 - beta1 ** self.steps)\n"
                            "        v_hat = self.exp_avg_sq_shard / (1 - beta2 ** self.steps)\n",
                            "        m_hat, v_hat = self.exp_avg_shard, self.exp_avg_sq_shard\n"), None,
                           "ex5_test_matches_adam"),
    "betas swapped": (("beta1, beta2 = self.betas", "beta2, beta1 = self.betas"), None, "ex5_test_matches_adam"),
    "eps inside the square root": (("v_hat.sqrt() + self.eps", "(v_hat + self.eps).sqrt()"), None,
                                   "ex5_test_matches_adam"),
    "the step counted after the update (bias corrections one step late)": (
        ("        self.steps += 1\n", ""), None, "ex5_test_matches_adam"),
}

FULL_MOMENTS = EX5_HEADER.replace(
    "        self.exp_avg_shard = torch.zeros(self.shard_size, dtype=dtype)      # m, for this rank's positions only\n",
    "        self.exp_avg_shard = torch.zeros(self.shard_size * self.world, dtype=dtype)\n").replace(
    "        self.exp_avg_sq_shard = torch.zeros(self.shard_size, dtype=dtype)   # v, likewise\n",
    "        self.exp_avg_sq_shard = torch.zeros(self.shard_size * self.world, dtype=dtype)\n") + '''
    @torch.no_grad()
    def step(self):
        flat_grad = torch.zeros(self.shard_size * self.world)
        flat_grad[:self.numel] = torch.cat([p.grad.reshape(-1) for p in self.params])
        grad_shard = torch.empty(self.shard_size)
        distributed.reduce_scatter_single(grad_shard, flat_grad)
        full_grad = torch.empty(self.shard_size * self.world)
        distributed.all_gather_single(full_grad, grad_shard / self.world)
        b1, b2 = self.betas
        self.steps += 1
        self.exp_avg_shard.mul_(b1).add_(full_grad, alpha=1 - b1)
        self.exp_avg_sq_shard.mul_(b2).addcmul_(full_grad, full_grad, value=1 - b2)
        update = (self.exp_avg_shard / (1 - b1 ** self.steps)) / (
            (self.exp_avg_sq_shard / (1 - b2 ** self.steps)).sqrt() + self.eps)
        offset = 0
        for p in self.params:
            p.sub_(self.lr * update[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
'''


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    check_alternative("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message, cell = EX5_WRONG[name]
    check_mistake("ex5", mutate("ex5", (old, new)), message, cell)


def test_ex5_full_size_moments_lose_the_sharding_points():
    outcome = NB.run("ex5", FULL_MOMENTS)
    assert outcome.earned["ex5_test_matches_adam"] > 0, "the arithmetic is right"
    assert outcome.earned["ex5_test_sharded"] == 0
    assert "keep only this rank's shard" in outcome.errors["ex5_test_sharded"]


# ---------------------------------------------------------------------------------------------
# Exercise 6: the tensor-parallel MLP
# ---------------------------------------------------------------------------------------------

EX6_CORRECT = {
    "clone in f, async all-reduce in g, chunk() for the slices": '''
class CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, async_op=True).wait()
        return total


class ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        total = x.contiguous().clone()
        dist.all_reduce(total, async_op=True).wait()
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


class TensorParallelMLP(nn.Module):
    def __init__(self, fc1, fc2):
        super().__init__()
        rank, world = dist.get_rank(), dist.get_world_size()
        w1 = fc1.weight.detach().chunk(world, dim=0)[rank]
        b1 = fc1.bias.detach().chunk(world)[rank]
        w2 = fc2.weight.detach().chunk(world, dim=1)[rank]
        self.fc1 = nn.Linear(w1.shape[1], w1.shape[0])
        self.fc2 = nn.Linear(w2.shape[1], w2.shape[0])
        self.fc1.weight = nn.Parameter(w1.clone())
        self.fc1.bias = nn.Parameter(b1.clone())
        self.fc2.weight = nn.Parameter(w2.clone())
        self.fc2.bias = nn.Parameter(fc2.bias.detach().clone())

    def forward(self, x):
        x = CopyToTensorParallel.apply(x)
        partial = F.gelu(x @ self.fc1.weight.T + self.fc1.bias) @ self.fc2.weight.T
        return ReduceFromTensorParallel.apply(partial) + self.fc2.bias
''',
    "narrow() and the bias of fc2 added by a module hook-free helper": '''
class CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        out = grad * 1.0
        dist.all_reduce(out)
        return out


class ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x * 1.0
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class TensorParallelMLP(nn.Module):
    def __init__(self, fc1, fc2):
        super().__init__()
        world, rank = dist.get_world_size(), dist.get_rank()
        width = fc1.out_features // world
        self.fc1 = nn.Linear(fc1.in_features, width)
        self.fc2 = nn.Linear(width, fc2.out_features)
        self.fc1.load_state_dict({"weight": fc1.weight.narrow(0, rank * width, width),
                                  "bias": fc1.bias.narrow(0, rank * width, width)})
        self.fc2.load_state_dict({"weight": fc2.weight.narrow(1, rank * width, width), "bias": fc2.bias})

    def forward(self, x):
        h = F.gelu(self.fc1(CopyToTensorParallel.apply(x)))
        return torch.add(ReduceFromTensorParallel.apply(F.linear(h, self.fc2.weight)), self.fc2.bias)
''',
}

EX6_WRONG = {
    "no all-reduce after the row-parallel layer": ((
        "        return ReduceFromTensorParallel.apply(F.linear(hidden, self.fc2.weight)) + self.fc2.bias\n",
        "        return F.linear(hidden, self.fc2.weight) + self.fc2.bias\n"),
        "the all-reduce after the row-parallel layer is missing", "ex6_test_forward"),
    "bias added before the all-reduce": ((
        "        return ReduceFromTensorParallel.apply(F.linear(hidden, self.fc2.weight)) + self.fc2.bias\n",
        "        return ReduceFromTensorParallel.apply(self.fc2(hidden))\n"),
        "fc2's bias added on every rank before the all-reduce", "ex6_test_forward"),
    "f's backward all-reduce missing": ((
        "        grad = grad.clone()\n        dist.all_reduce(grad)\n        return grad\n",
        "        return grad\n"), "f's backward all-reduce is missing", "ex6_test_backward"),
    "an all-reduce in g's backward too": ((
        "    @staticmethod\n    def backward(ctx, grad):\n        ### BEGIN SOLUTION\n        return grad\n",
        "    @staticmethod\n    def backward(ctx, grad):\n        ### BEGIN SOLUTION\n        grad = grad.clone()\n"
        "        dist.all_reduce(grad)\n        return grad\n"),
        "an all-reduce in g's backward too?", "ex6_test_backward"),
    "fc1 split by input features": ((
        "        self.fc1 = nn.Linear(fc1.in_features, shard)\n",
        "        self.fc1 = nn.Linear(fc1.in_features // world, fc1.out_features)\n"),
        None, "ex6_test_forward"),
}


@pytest.mark.parametrize("name", EX6_CORRECT)
def test_ex6_correct_alternatives_get_full_marks(name):
    check_alternative("ex6", EX6_CORRECT[name])


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    (old, new), message, cell = EX6_WRONG[name]
    check_mistake("ex6", mutate("ex6", (old, new)), message, cell)


# ---------------------------------------------------------------------------------------------
# Exercise 7: the 1F1B schedule
# ---------------------------------------------------------------------------------------------

EX7_CORRECT = {
    "backward first in the steady state, one more warm-up forward": '''
def one_f_one_b(stage, n_stages, n_microbatches):
    warmup = min(n_stages - stage, n_microbatches)
    steps = [("F", m) for m in range(warmup)]
    for m in range(n_microbatches - warmup):
        steps += [("B", m), ("F", m + warmup)]
    steps += [("B", m) for m in range(n_microbatches - warmup, n_microbatches)]
    return steps
''',
    "a generator over one timeline": '''
def one_f_one_b(stage, n_stages, n_microbatches):
    def steps():
        forwards, backwards = iter(range(n_microbatches)), iter(range(n_microbatches))
        for _ in range(min(n_stages - stage - 1, n_microbatches)):
            yield "F", next(forwards)
        for m in forwards:
            yield "F", m
            yield "B", next(backwards)
        for m in backwards:
            yield "B", m
    return list(steps())
''',
}

EX7_WRONG = {
    "GPipe order": (("    warmup = min(n_stages - stage - 1, n_microbatches)\n",
                     "    warmup = n_microbatches\n"), "(All forwards first is GPipe.)", "ex7_test_schedule"),
    "one warm-up forward too many": (("    warmup = min(n_stages - stage - 1, n_microbatches)\n",
                                      "    warmup = min(n_stages - stage, n_microbatches)\n"),
                                     "Too many warm-up forwards?", "ex7_test_schedule"),
    "one warm-up forward too few": (("    warmup = min(n_stages - stage - 1, n_microbatches)\n",
                                     "    warmup = max(min(n_stages - stage - 2, n_microbatches), 0)\n"),
                                    "Too few warm-up forwards", "ex7_test_schedule"),
    "warm-up not capped by the number of microbatches": (
        ("    warmup = min(n_stages - stage - 1, n_microbatches)\n", "    warmup = n_stages - stage - 1\n"),
        None, "ex7_test_schedule"),
    "cool-down backwards in reverse order": (
        ("    steps += [(\"B\", m) for m in range(next_backward, n_microbatches)]\n",
         "    steps += [(\"B\", m) for m in reversed(range(next_backward, n_microbatches))]\n"),
        None, "ex7_test_schedule"),
}


@pytest.mark.parametrize("name", EX7_CORRECT)
def test_ex7_correct_alternatives_get_full_marks(name):
    check_alternative("ex7", EX7_CORRECT[name])


@pytest.mark.parametrize("name", EX7_WRONG)
def test_ex7_mistakes_lose_points(name):
    (old, new), message, cell = EX7_WRONG[name]
    check_mistake("ex7", mutate("ex7", (old, new)), message, cell)


def test_ex7_a_schedule_that_deadlocks_fails_fast_in_the_pipeline_test():
    """Stages numbered backwards: stage 0 waits for a backward before sending the forward its
    neighbour waits for. The simulator refuses it, so no rank hangs until the timeout."""
    outcome = NB.run("ex7", mutate("ex7", ("    warmup = min(n_stages - stage - 1, n_microbatches)\n",
                                           "    warmup = min(stage, n_microbatches)\n")))
    assert sum(outcome.earned.values()) == 0
    assert "cannot run: deadlock" in outcome.errors["ex7_test_pipeline"]


# ---------------------------------------------------------------------------------------------
# Exercise 8: the ZB-H1 schedule (backward split into B and W)
# ---------------------------------------------------------------------------------------------

EX8_CORRECT = {
    "a queue of postponed weight gradients": '''
def zero_bubble_h1(stage, n_stages, n_microbatches):
    forwards = list(range(n_microbatches))
    steps = [("F", forwards.pop(0)) for _ in range(min(n_stages - stage - 1, n_microbatches))]
    pending = []
    for m in range(n_microbatches):
        if forwards:
            steps.append(("F", forwards.pop(0)))
        steps.append(("B", m))
        pending.append(m)
        if len(pending) > stage:
            steps.append(("W", pending.pop(0)))
    return steps + [("W", m) for m in pending]
''',
    "1F1B's order first, then a W inserted after the right B": '''
def zero_bubble_h1(stage, n_stages, n_microbatches):
    warmup = min(n_stages - stage - 1, n_microbatches)
    order = [("F", m) for m in range(warmup)]
    for m in range(warmup, n_microbatches):
        order += [("F", m), ("B", m - warmup)]
    order += [("B", m) for m in range(n_microbatches - warmup, n_microbatches)]
    steps = []
    for kind, m in order:
        steps.append((kind, m))
        if kind == "B" and m - stage >= 0:
            steps.append(("W", m - stage))
    done = {m for kind, m in steps if kind == "W"}
    return steps + [("W", m) for m in range(n_microbatches) if m not in done]
''',
}

EX8_WRONG = {
    "every W right after its B": ([("        if m >= stage:", "        if m >= 0:")],
                                  "postpone some W on the later stages"),
    "W postponed on the early stages instead of the late ones": (
        [("        if m >= stage:", "        if m >= n_stages - stage - 1:")], "Too many weight gradients postponed?"),
    "one W too many postponed": ([("        if m >= stage:", "        if m >= stage + 1:")],
                                 "Too many weight gradients postponed?"),
    "one W too few postponed": ([("        if m >= stage:", "        if m >= max(stage - 1, 0):")],
                                "ZB-H1 idles at most"),
    "every W at the end": ([("        if m >= stage:", "        if False:")], "Too many weight gradients postponed?"),
    "no W at all (the backward not split)": (
        [("            steps.append((\"W\", next_weight))\n", ""),
         ("    steps += [(\"W\", m) for m in range(next_weight, n_microbatches)]\n", "")], "runs no ('W', m) step"),
}


@pytest.mark.parametrize("name", EX8_CORRECT)
def test_ex8_correct_alternatives_get_full_marks(name):
    check_alternative("ex8", EX8_CORRECT[name])


@pytest.mark.parametrize("name", EX8_WRONG)
def test_ex8_mistakes_lose_points(name):
    replacements, message = EX8_WRONG[name]
    check_mistake("ex8", mutate("ex8", *replacements), message)


# ---------------------------------------------------------------------------------------------
# Shortcuts: each scores 0 on every test cell of its exercise (tests/test_shortcuts_every_phase.py)
# ---------------------------------------------------------------------------------------------

SHORTCUTS = {
    "ex1": {
        "the course's per-category helper": """
def model_state_bytes(n_params, world_size, zero_stage):
    return sum(memory_accounting.model_state_categories(n_params, world_size, zero_stage).values())
""",
        "the same helper under its old module name": """
from utils import parallelism

def model_state_bytes(n_params, world_size, zero_stage):
    return sum(parallelism.model_state_categories(n_params, world_size, zero_stage).values())
""",
    },
    "ex2": {
        "dist.all_reduce": """
def ring_all_reduce(tensor):
    dist.all_reduce(tensor)
    return tensor
""",
        "the course's reduce-scatter and all-gather": """
def ring_all_reduce(tensor):
    world = dist.get_world_size()
    flat = tensor.reshape(-1)
    size = -(-flat.numel() // world)
    padded = torch.zeros(size * world, dtype=tensor.dtype)
    padded[:flat.numel()] = flat
    mine = torch.empty(size, dtype=tensor.dtype)
    distributed.reduce_scatter_single(mine, padded)
    distributed.all_gather_single(padded, mine)
    tensor.copy_(padded[:flat.numel()].view_as(tensor))
    return tensor
""",
    },
    "ex3": {
        "DDP's averaging all-reduce hook": """
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import _allreduce_fut

def average_gradients(model):
    for p in model.parameters():
        if p.grad is not None:
            _allreduce_fut(dist.group.WORLD, p.grad).wait()
""",
    },
    "ex4": {
        "DDP's averaging all-reduce hook": EX4_HEADER + """
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import _allreduce_fut
        self.futures = []
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: self.futures.append(_allreduce_fut(None, p.grad)))

    def _grad_ready(self, p):
        pass

    def finish(self):
        for future in self.futures:
            future.wait()
        self.futures = []
""",
        "DistributedDataParallel itself": EX4_HEADER + """
        from torch.nn.parallel import DistributedDataParallel
        self.ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_bytes / 2**20)

    def _grad_ready(self, p):
        pass

    def finish(self):
        pass
""",
    },
    "ex5": {
        "torch.optim.Adam on the shard": EX5_HEADER + """
    @torch.no_grad()
    def step(self):
        if not hasattr(self, "shard"):
            flat = torch.zeros(self.shard_size * self.world)
            flat[:self.numel] = torch.cat([p.reshape(-1) for p in self.params])
            self.shard = flat[self.start:self.start + self.shard_size].clone().requires_grad_(True)
            self.inner = torch.optim.Adam([self.shard], lr=self.lr, betas=self.betas, eps=self.eps)
        flat_grad = torch.zeros(self.shard_size * self.world)
        flat_grad[:self.numel] = torch.cat([p.grad.reshape(-1) for p in self.params])
        grad = torch.empty(self.shard_size)
        distributed.reduce_scatter_single(grad, flat_grad)
        self.shard.grad = grad / self.world
        self.inner.step()
        full = torch.empty(self.shard_size * self.world)
        distributed.all_gather_single(full, self.shard.detach())
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
""",
        "ZeroRedundancyOptimizer": """
class ZeroAdam:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        self.params = list(params)
        self.inner = ZeroRedundancyOptimizer(self.params, optimizer_class=torch.optim.Adam, lr=lr, betas=betas,
                                             eps=eps)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        self.inner.step()
""",
    },
    "ex6": {
        "parallelize_module with ColwiseParallel / RowwiseParallel": """
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


class CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class ReduceFromTensorParallel(CopyToTensorParallel):
    pass


class TensorParallelMLP(nn.Module):
    def __init__(self, fc1, fc2):
        super().__init__()
        self.fc1, self.fc2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
        parallelize_module(self, init_device_mesh("cpu", (dist.get_world_size(),)),
                           {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))
""",
    },
    "ex7": {
        "the course's interleaved schedule with one chunk": """
def one_f_one_b(stage, n_stages, n_microbatches):
    return [(kind, m) for kind, m, _ in pipeline.interleaved_1f1b_schedule(stage, n_stages, n_microbatches, 1)]
""",
        "the course's zero-bubble schedule without its W steps": """
def one_f_one_b(stage, n_stages, n_microbatches):
    return [step for step in pipeline.zero_bubble_h1_schedule(stage, n_stages, n_microbatches) if step[0] != "W"]
""",
        "torch.distributed.pipelining's 1F1B order": """
from torch.distributed.pipelining.schedules import _ComputationType, _get_1f1b_rank_ops

def one_f_one_b(stage, n_stages, n_microbatches):
    warmup = min(n_stages - stage - 1, n_microbatches)
    ops = _get_1f1b_rank_ops(1, n_stages, warmup, n_microbatches - warmup, warmup, stage,
                             lambda op: stage, lambda op: stage)
    return [("F" if a.computation_type == _ComputationType.FORWARD else "B", a.microbatch_index)
            for a in ops if a is not None]
""",
    },
    "ex8": {
        "the course's ZB-H1 schedule": """
def zero_bubble_h1(stage, n_stages, n_microbatches):
    return pipeline.zero_bubble_h1_schedule(stage, n_stages, n_microbatches)
""",
        "the course's ZB-H1 under the old module name": """
from utils import parallelism

def zero_bubble_h1(stage, n_stages, n_microbatches):
    return list(parallelism.zero_bubble_h1_schedule(stage, n_stages, n_microbatches))
""",
        "the course's interleaved 1F1B with a W after every B": """
def zero_bubble_h1(stage, n_stages, n_microbatches):
    steps = []
    for kind, m, _ in pipeline.interleaved_1f1b_schedule(stage, n_stages, n_microbatches, 1):
        steps += [(kind, m), ("W", m)] if kind == "B" else [(kind, m)]
    return steps
""",
    },
}
