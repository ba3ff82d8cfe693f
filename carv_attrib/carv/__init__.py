"""The CARV estimator core: many cheap (σ, ε) draws per cached latent, unbiased by construction.

g(z, c) = E_{σ~p, ε~N(0,I)}[∇θ ℓ(θ; z, c, σ, ε)] is estimated from one cached latent z with K draws,
σ_k stratified by inverse CDF over a proposal q and weighted w_k = p(σ_k)/q(σ_k) (ARCHITECTURE §2).
Depends on torch only; knows nothing about video, files or Wan loading.

    rng         counter-based common random numbers: U_k and ε_k as pure functions of (seed, stream, k)
    timesteps   p(σ) densities, the proposal q, `sample(scheme, n, ...)` → (σ, w)
    draws       the `DrawRule` recorded with every index: (seed, scheme, K, p, q, noise) → (σ, w, ε)
    objective   Wan2.1 flow-matching loss / sqnorm over K draws, weights folded in
    weights     the motion objective's per-token loss weights from a motion map (numpy)
    accounting  cost and variance model, effective compute multiplier (ECM), optimal K

Usage:

    from carv_attrib.carv.draws import DrawRule
    from carv_attrib.carv.objective import clip_objective

    rule = DrawRule(seed=0, scheme="stratified-is", k=8, density="logit-normal:0,1")
    sigma, w, eps = rule.draws_for(rule.stream_for(clip_id), z.shape, device=z.device)
    objective, per_draw = clip_objective(transformer, z, context, sigma, eps, w)
    objective.backward()   # gradient = (1/K) Σ_k w_k ∇θ ℓ_k
"""
