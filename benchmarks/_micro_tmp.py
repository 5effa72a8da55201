import torch, time, statistics
import torch.nn.functional as F
from saecli.dictionaries import kernels
torch.set_num_threads(2)
N,d,s,k=4096,576,4608,32
torch.manual_seed(0)
x=torch.randn(N,d); W=torch.randn(s,d)*0.05; b=torch.randn(s)*0.1; buf=torch.empty(N,s)
torch.addmm(b,x,W.t(),out=buf)
def tl(c,G):
    n,dd=c.shape; S=dd//G
    gm=torch.amax(c.view(n,G,S),1); gi=torch.topk(gm,k,dim=1,sorted=False).indices
    cand=(gi.unsqueeze(2)+torch.arange(G)*S).view(n,k*G)
    v,p=torch.topk(torch.gather(c,1,cand),k,dim=1,sorted=False); return v, torch.gather(cand,1,p)
idx=torch.topk(buf,k,dim=1,sorted=False).indices
pat=kernels.SparsePattern.from_topk(idx,s)
v=torch.rand(N*k); g=torch.randn(N,d); bd=torch.randn(d)
csr=pat.csr(v)
V={
 'matmul': lambda: torch.addmm(b,x,W.t(),out=buf),
 'mm nobias': lambda: torch.mm(x,W.t(),out=buf),
 'torch.topk': lambda: torch.topk(buf,k,dim=1,sorted=False),
 'two G4': lambda: tl(buf,4), 'two G8': lambda: tl(buf,8), 'two G16': lambda: tl(buf,16),
 'amax G8': lambda: torch.amax(buf.view(N,8,576),1),
 'topk 576': lambda: torch.topk(buf[:, :576].contiguous(),k,dim=1,sorted=False),
 'csr@W': lambda: csr@W, 'addmm csr bias': lambda: torch.addmm(bd.expand(N,d),csr,W),
 'embbag': lambda: F.embedding_bag(idx,W,per_sample_weights=v.view(N,k),mode='sum'),
 'sampled': lambda: torch.sparse.sampled_addmm(csr,g,W.t(),beta=0.0),
 'bmm-gather dv(chunk 512)': lambda: [torch.bmm(W[idx[i:i+512]], g[i:i+512].unsqueeze(2)) for i in range(0,N,512)],
 'csr_t build+mm': lambda: (kernels.SparsePattern.from_topk(idx,s).csr_t(v)@g),
 'csc .t()@g': lambda: csr.t()@g,
 'fused adam-ish add_': lambda: W.add_(W, alpha=0.0),
}
for f in V.values(): f()
res={n:[] for n in V}
for r in range(7):
    for n,f in V.items():
        t0=time.perf_counter(); f(); res[n].append(time.perf_counter()-t0)
for n,t in res.items(): print(f"{n:26s} {statistics.median(t)*1e3:7.2f} ms")
