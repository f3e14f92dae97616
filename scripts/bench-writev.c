/* What a direct write to a batching connection costs the kernel: N frames of 170
 * bytes as one writev of 2N slices (mode 0) against copied into one buffer and
 * written with one write (mode 1), into a loopback TCP socket that a thread drains.
 * The figures in src/ws.rs (join_front) come from:
 *   gcc -O2 -o /tmp/bench-writev scripts/bench-writev.c -lpthread
 *   for n in 50 250; do for m in 0 1 0 1; do /tmp/bench-writev $n $m 20000; done; done
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <time.h>
static int port;
static void *reader(void *a){ int fd=*(int*)a; char b[1<<16]; while(read(fd,b,sizeof b)>0); return 0; }
static double now(){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9; }
static double cpu(){ struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+t.tv_nsec*1e-9; }
int main(int argc,char**argv){
  int n=atoi(argv[1]); int mode=atoi(argv[2]); int iters=atoi(argv[3]);
  int l=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in sa={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)};
  bind(l,(void*)&sa,sizeof sa); socklen_t sl=sizeof sa; getsockname(l,(void*)&sa,&sl); listen(l,1);
  int c=socket(AF_INET,SOCK_STREAM,0); connect(c,(void*)&sa,sizeof sa); int s=accept(l,0,0);
  int one=1; setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
  pthread_t t; pthread_create(&t,0,reader,&c);
  char hdr[2]={0x81,0x7e}; char *msgs=malloc(n*170); memset(msgs,'x',n*170);
  struct iovec *iov=malloc(sizeof(struct iovec)*2*n); char *buf=malloc(n*172+16);
  double c0=cpu(), w0=now(); long bytes=0;
  for(int it=0;it<iters;it++){
    if(mode==0){ for(int i=0;i<n;i++){iov[2*i].iov_base=hdr;iov[2*i].iov_len=2;iov[2*i+1].iov_base=msgs+i*170;iov[2*i+1].iov_len=170;}
      int done=0; while(done<2*n){ int k=2*n-done; if(k>1024)k=1024; ssize_t r=writev(s,iov+done,k); if(r<0){perror("w");return 1;} bytes+=r;
        /* assume full writes (blocking socket) */ done+=k; } }
    else { size_t p=0; buf[p++]=0x81; buf[p++]=0x7e; buf[p++]=0; buf[p++]=0; for(int i=0;i<n;i++){ memcpy(buf+p,msgs+i*170,170); p+=170; buf[p++]='\n'; }
      ssize_t r=write(s,buf,p); if(r<0){perror("w");return 1;} bytes+=r; }
  }
  double c1=cpu(), w1=now();
  printf("n=%d mode=%s: %.2f us cpu per write, %.2f us wall, %ld MB\n", n, mode?"memcpy+write":"writev", (c1-c0)/iters*1e6, (w1-w0)/iters*1e6, bytes>>20);
  return 0; }
