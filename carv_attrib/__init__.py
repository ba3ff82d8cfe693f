"""carv-attrib: which training clips shaped this generated video?

Training-data attribution for video diffusion models (Wan2.1-T2V) with the CARV estimator:
encode each clip once, reuse the encode for K cheap (timestep, noise) draws drawn by stratified
inverse-CDF importance sampling, project the averaged gradients, and search them with FAISS.
"""

__version__ = "0.1.0"
