/*
 * Java user functions for the keystate Flink fixture jobs (compiled by flink_fixtures.py at run time
 * against the jars of the installed PyFlink; not part of keystate and never shipped).
 *
 * Only building blocks live here; the job topologies are assembled in Python through the py4j
 * gateway (flink_fixtures.py), so that every variant of a restore experiment is visible in one place.
 * Compiles against Flink 1.20 and 2.x.
 */
package keystate.flinkgen;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.connector.source.ReaderOutput;
import org.apache.flink.api.connector.source.SourceReader;
import org.apache.flink.api.connector.source.SourceReaderContext;
import org.apache.flink.api.connector.source.SplitEnumerator;
import org.apache.flink.api.connector.source.SplitEnumeratorContext;
import org.apache.flink.api.connector.source.lib.NumberSequenceSource;
import org.apache.flink.api.connector.source.lib.util.IteratorSourceEnumerator;
import org.apache.flink.api.connector.source.lib.util.IteratorSourceReader;
import org.apache.flink.core.io.InputStatus;
import org.apache.flink.util.NumberSequenceIterator;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.DataStreamSink;
import org.apache.flink.streaming.api.datastream.KeyedStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.util.Collector;

import java.util.Collection;

public final class KeystateFixtureOps {
    private KeystateFixtureOps() {}

    /**
     * NumberSequenceSource whose enumerator cuts the range into a fixed number of splits instead of one
     * per reader, and whose readers sleep {@code sleepMillis} before each record. With more readers than
     * splits, the readers left without a split finish at once while the others keep reading: a partially
     * finished source without any restore trick. Throttling in the reader (not in a downstream map) keeps
     * network buffers empty, so aligned checkpoints stay fast whatever the chaining.
     */
    public static class FixedSplitsSource extends NumberSequenceSource {
        private static final long serialVersionUID = 1L;
        private final int splits;
        private final long sleepMillis;

        public FixedSplitsSource(long from, long to, int splits, long sleepMillis) {
            super(from, to);
            this.splits = splits;
            this.sleepMillis = sleepMillis;
        }

        @Override
        public SourceReader<Long, NumberSequenceSplit> createReader(SourceReaderContext ctx) {
            final long sleep = sleepMillis;
            return new IteratorSourceReader<Long, NumberSequenceIterator, NumberSequenceSplit>(ctx) {
                @Override
                public InputStatus pollNext(ReaderOutput<Long> output) {
                    if (sleep > 0) {
                        try {
                            Thread.sleep(sleep);
                        } catch (InterruptedException e) {
                            Thread.currentThread().interrupt();
                        }
                    }
                    return super.pollNext(output);
                }
            };
        }

        @Override
        public SplitEnumerator<NumberSequenceSplit, Collection<NumberSequenceSplit>> createEnumerator(
                SplitEnumeratorContext<NumberSequenceSplit> ctx) {
            int n = splits > 0 ? splits : ctx.currentParallelism();
            return new IteratorSourceEnumerator<>(ctx, splitNumberRange(getFrom(), getTo(), n));
        }
    }

    /** Identity map that sleeps {@code sleepMillis} per record (0: no sleep). */
    public static class Pass implements MapFunction<Long, Long> {
        private static final long serialVersionUID = 1L;
        private final long sleepMillis;

        public Pass(long sleepMillis) {
            this.sleepMillis = sleepMillis;
        }

        @Override
        public Long map(Long v) throws Exception {
            if (sleepMillis > 0) {
                Thread.sleep(sleepMillis);
            }
            return v;
        }
    }

    /** v % mod as the key. */
    public static class Mod implements KeySelector<Long, Long> {
        private static final long serialVersionUID = 1L;
        private final long mod;

        public Mod(long mod) {
            this.mod = mod;
        }

        @Override
        public Long getKey(Long v) {
            return v % mod;
        }
    }

    /** Keyed running sum ("sum") or count (any other state name) in a ValueState&lt;Long&gt;. */
    public static class Acc extends KeyedProcessFunction<Long, Long, Long> {
        private static final long serialVersionUID = 1L;
        private final String stateName;
        private transient ValueState<Long> state;

        public Acc(String stateName) {
            this.stateName = stateName;
        }

        @Override
        public void open(OpenContext ctx) {
            state = getRuntimeContext().getState(new ValueStateDescriptor<>(stateName, Types.LONG));
        }

        @Override
        public void processElement(Long v, Context ctx, Collector<Long> out) throws Exception {
            long s = (state.value() == null ? 0L : state.value()) + (stateName.equals("sum") ? v : 1L);
            state.update(s);
            out.collect(s);
        }
    }

    /**
     * Numbers from..to-1 as a source named and uid'ed {@code uid}; {@code splits} = 0 for one split per
     * reader (NumberSequenceSource's own behaviour); each reader sleeps {@code sleepMillis} per record.
     */
    public static DataStream<Long> source(StreamExecutionEnvironment env, String uid, long from, long to, int splits,
                                          long sleepMillis) {
        return env.fromSource(new FixedSplitsSource(from, to - 1, splits, sleepMillis),
                WatermarkStrategy.noWatermarks(), uid).uid(uid);
    }

    public static SingleOutputStreamOperator<Long> map(DataStream<Long> in, String uid, long sleepMillis) {
        return in.map(new Pass(sleepMillis), Types.LONG).name(uid).uid(uid);
    }

    public static KeyedStream<Long, Long> keyBy(DataStream<Long> in, long mod) {
        return in.keyBy(new Mod(mod), Types.LONG);
    }

    public static SingleOutputStreamOperator<Long> keyed(KeyedStream<Long, Long> in, String uid, String stateName) {
        return in.process(new Acc(stateName), Types.LONG).name(uid).uid(uid);
    }

    public static DataStream<Long> union(DataStream<Long> a, DataStream<Long> b) {
        return a.union(b);
    }

    /** A stateless Sink V2 (its Writer operator carries the uid). */
    public static DataStreamSink<Long> discard(DataStream<Long> in, String uid) {
        return in.sinkTo(new DiscardingSink<>()).name(uid).uid(uid);
    }
}
