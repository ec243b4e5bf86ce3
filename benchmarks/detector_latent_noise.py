"""How SceneEval's detector scores real renders that went through the shipped autoencoder, with Gaussian noise
added to their latents (a stand-in for a generator's imperfect latents; issue 20): 300 renders of one split.

    python benchmarks/detector_latent_noise.py [val|heldout]

Prints SceneEval per category for the renders, their VAE round trip, and latent noise 0.2 / 0.4 / 0.6 (a strip of
six images per level goes to /tmp/lat<sigma>.png). Measured 2026-12-03, val: 1.000, 1.000, 0.928, 0.475, 0.163.
"""
import sys, numpy as np, torch
from snapgen.vae.diffusers_adapter import load_autoencoder
from snapgen.data.scenes import SceneDataset
from snapgen.eval.detector import load_detector
from snapgen.eval.sceneeval import evaluate_images, metadata_from_scene, summarize
from PIL import Image
torch.set_num_threads(2)
vae = load_autoencoder("models/snapgen-micro/vae").eval()
ds = SceneDataset(64, seed=0, split=sys.argv[1] if len(sys.argv) > 1 else "val")
samples = [ds.generate(i) for i in range(300)]
ims = [s.image for s in samples]
x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in ims])).permute(0, 3, 1, 2)
with torch.no_grad():
    y = vae.decode_latents(vae.encode_latents(x))
rt = [Image.fromarray(((t.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for t in y]
metas = [metadata_from_scene(s) for s in samples]
det = load_detector()
for name, images in (("renders", ims), ("vae roundtrip", rt)):
    r = evaluate_images(images, metas, det)
    print(name, {k: round(v, 3) for k, v in summarize(r).items()})
rt[0].save("/tmp/rt0.png")
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    z = vae.encode_latents(x)
    for sigma in (0.2, 0.4, 0.6):
        y = vae.decode_latents(z + sigma * torch.randn(z.shape, generator=g))
        imgs = [Image.fromarray(((t.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for t in y]
        r = evaluate_images(imgs, metas, det)
        print("latent noise", sigma, {k: round(v, 3) for k, v in summarize(r).items()})
        row = Image.new("RGB", (64 * 6, 64))
        for j in range(6):
            row.paste(imgs[j], (64 * j, 0))
        row.resize((64 * 6 * 3, 64 * 3), Image.NEAREST).save(f"/tmp/lat{sigma}.png")
