"""PyTorch PPO on the FedPEAT MEC environment through gymnasium's vector API (CleanRL's
``ppo_multidiscrete.py`` pattern), written only against the public API.

``gymnasium.make_vec("FedPEAT-MEC-v0", num_envs)`` returns ``FedPEATVectorEnv``: all environments
advance in one jitted call, so the agent's loop sees a batch per ``step`` as with any vector env.
``autoreset_mode="same_step"`` gives the classic CleanRL semantics (the observation after a
finished episode is the next episode's first).

    python examples/torch_ppo_vector_env.py --total-timesteps 100000
"""

from __future__ import annotations

import argparse
import time

import gymnasium
import numpy as np
import torch
from torch import nn

import fedpeat_jax.mec  # noqa: F401  (registers FedPEAT-MEC-v0 with gymnasium)


class Agent(nn.Module):
    def __init__(self, obs_dim: int, nvec):
        super().__init__()
        self.nvec = [int(n) for n in nvec]

        def layer(i, o, std=np.sqrt(2)):
            lin = nn.Linear(i, o)
            nn.init.orthogonal_(lin.weight, std)
            nn.init.zeros_(lin.bias)
            return lin

        self.trunk = nn.Sequential(layer(obs_dim, 64), nn.Tanh(), layer(64, 64), nn.Tanh())
        self.actor = layer(64, sum(self.nvec), 0.01)
        self.critic = layer(64, 1, 1.0)

    def value(self, x):
        return self.critic(self.trunk(x)).squeeze(-1)

    def act(self, x, action=None):
        h = self.trunk(x)
        dists = [torch.distributions.Categorical(logits=z) for z in torch.split(self.actor(h), self.nvec, dim=-1)]
        if action is None:
            action = torch.stack([d.sample() for d in dists], dim=-1)
        logp = torch.stack([d.log_prob(a) for d, a in zip(dists, action.unbind(-1))], -1).sum(-1)
        entropy = torch.stack([d.entropy() for d in dists], -1).sum(-1)
        return action, logp, entropy, self.critic(h).squeeze(-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-timesteps", type=int, default=200_000)
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    envs = gymnasium.make_vec("FedPEAT-MEC-v0", num_envs=args.num_envs, autoreset_mode="same_step")
    nvec = envs.single_action_space.nvec
    agent = Agent(envs.single_observation_space.shape[0], nvec)
    opt = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
    E, T = args.num_envs, args.num_steps
    obs_buf = torch.zeros((T, E) + envs.single_observation_space.shape)
    act_buf = torch.zeros((T, E, len(nvec)), dtype=torch.long)
    logp_buf, rew_buf, done_buf, val_buf = (torch.zeros((T, E)) for _ in range(4))
    obs, _ = envs.reset(seed=args.seed)
    obs, done = torch.as_tensor(np.array(obs)), torch.zeros(E)  # a copy: the env hands out read-only arrays
    ep_return, finished, started = np.zeros(E), [], time.time()
    for update in range(args.total_timesteps // (E * T)):
        for t in range(T):
            obs_buf[t], done_buf[t] = obs, done
            with torch.no_grad():
                action, logp, _, value = agent.act(obs)
            act_buf[t], logp_buf[t], val_buf[t] = action, logp, value
            obs, reward, term, trunc, _ = envs.step(action.numpy())
            rew_buf[t] = torch.as_tensor(reward, dtype=torch.float32)
            obs, done = torch.as_tensor(np.array(obs)), torch.as_tensor(term | trunc, dtype=torch.float32)
            ep_return += reward
            finished += ep_return[term | trunc].tolist()
            ep_return[term | trunc] = 0.0
        with torch.no_grad():  # GAE; an episode end is terminal (t / T is in the observation)
            adv, last, next_value = torch.zeros((T, E)), torch.zeros(E), agent.value(obs)
            for t in reversed(range(T)):
                not_done = 1.0 - (done if t == T - 1 else done_buf[t + 1])
                nv = next_value if t == T - 1 else val_buf[t + 1]
                last = rew_buf[t] + 0.99 * nv * not_done - val_buf[t] + 0.99 * 0.95 * not_done * last
                adv[t] = last
            ret = adv + val_buf
        b = [x.reshape((E * T,) + x.shape[2:]) for x in (obs_buf, act_buf, logp_buf, adv, ret, val_buf)]
        for _ in range(4):
            for idx in torch.randperm(E * T).split(E * T // 16):
                o, a, lp, ad, rt, v = (x[idx] for x in b)
                _, new_lp, ent, new_v = agent.act(o, a)
                ratio = (new_lp - lp).exp()
                ad = (ad - ad.mean()) / (ad.std() + 1e-8)
                pg = -torch.min(ratio * ad, ratio.clamp(0.8, 1.2) * ad).mean()
                loss = pg + 0.5 * ((new_v - rt) ** 2).mean() - 0.01 * ent.mean()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
                opt.step()
        if finished:
            print(f"update {update + 1}: mean episode return {np.mean(finished[-E:]):.2f}")
    seconds = time.time() - started
    print(f"{args.total_timesteps:,} steps in {seconds:.1f} s")
    return {"returns": finished, "seconds": seconds}


if __name__ == "__main__":
    main()
