import torch
from aofunc.kernels import w4a16, w8a16, int8_int4 as K
torch.manual_seed(0)
def cm(t): return t.t().contiguous().t()
x=torch.randn(5,128).bfloat16()
q=torch.randint(0,256,(40,64),dtype=torch.uint8); s=(torch.rand(40,2)*0.02+1e-3).bfloat16(); z=(torch.rand(40,2)).bfloat16(); zu=torch.randint(0,16,(40,2),dtype=torch.uint8)
b=torch.randn(40).bfloat16()
for zero in (None, z, zu):
  for path in ("dequant","gemm","gemv"):
    c=w4a16.default_config(5 if path!="gemv" else 1, 40,128,64,torch.bfloat16,x.device); 
    xx = x if path!="gemv" else x[:1]
    if c["path"]!=path: c=dict(path="dequant") if path=="dequant" else c
    ref=w4a16.w4a16_linear_triton(xx,q,s,zero,64,b,config=c)
    for name,(qq,ss,zz) in {"q":(cm(q),s,zero),"s":(q,cm(s),zero),"z":(q,s,None if zero is None else cm(zero))}.items():
        try:
            out=w4a16.w4a16_linear_triton(xx,qq,ss,zz,64,b,config=c)
            print("w4a16", None if zero is None else zero.dtype, c["path"], name, torch.equal(out,ref))
        except Exception as e: print("w4a16",path,name,"ERR",e)
q8=torch.randint(-128,128,(40,128),dtype=torch.int8); s8=(torch.rand(40)*0.02).bfloat16()
for m in (1,5):
    c=w8a16.default_config(m,40,128,torch.bfloat16,x.device)
    for cc in (c, dict(path="dequant")):
        ref=w8a16.w8a16_linear_triton(x[:m],q8,s8,b,config=cc)
        out=w8a16.w8a16_linear_triton(x[:m],cm(q8),s8,b,config=cc)
        print("w8a16",cc["path"],torch.equal(out,ref))
